"""Registry of namespaces: the first Put of (tenant, name, tp_rank) fixes its layout.

Any later request naming the same namespace with another layout is refused with
InvalidArgument. The layout includes whether keys are stored pre- or post-RoPE, so
a sparse-decode client and a prefix-reuse client never read each other's keys.
The registry is persisted as JSON next to the disk tier's objects (temp file +
fsync + rename, so a crash leaves the old or the new file, never a torn one) and
survives restarts; with the disk tier off it lives in memory only. An unknown
namespace is not an error: reads of it are misses.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from kvstore.errors import InvalidArgument
from kvstore.keys import Namespace
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)

REGISTRY_FILE = "namespaces.json"
_FORMAT_VERSION = 1

NamespaceName = tuple[str | None, str, int]  # (tenant, name, tp_rank)


def _name_of(namespace: Namespace) -> NamespaceName:
    return (namespace.tenant, namespace.name, namespace.tp_rank)


def _layout_to_json(layout: KVLayout) -> dict[str, int | str]:
    return {
        "num_layers": layout.num_layers, "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim, "dtype": layout.dtype, "chunk_tokens": layout.chunk_tokens,
        "keys_pre_rope": layout.keys_pre_rope,
    }


class NamespaceRegistry:
    """Thread-safe map of namespace name -> layout, optionally persisted in ``directory``."""

    __slots__ = ("_layouts", "_lock", "_path")

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self._lock = threading.Lock()
        self._layouts: dict[NamespaceName, KVLayout] = {}
        self._path = Path(directory) / REGISTRY_FILE if directory is not None else None
        if self._path is not None:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._load()

    @property
    def path(self) -> Path | None:
        """The JSON file the registry lives in; None when it is in memory only."""
        return self._path

    def __len__(self) -> int:
        with self._lock:
            return len(self._layouts)

    def layout_of(self, namespace: Namespace) -> KVLayout | None:
        """The registered layout of ``namespace``'s name; None if it was never written."""
        with self._lock:
            return self._layouts.get(_name_of(namespace))

    def check(self, namespace: Namespace) -> bool:
        """True if the namespace is registered with this layout, False if unknown.

        Raises:
            InvalidArgument: the namespace is registered with another layout.
        """
        registered = self.layout_of(namespace)
        if registered is None:
            return False
        if registered != namespace.layout:
            raise InvalidArgument(_clash_message(namespace, registered))
        return True

    def register(self, namespace: Namespace) -> bool:
        """Fix the namespace's layout if it is new; True if this call registered it.

        Raises:
            InvalidArgument: the namespace is registered with another layout.
        """
        key = _name_of(namespace)
        with self._lock:
            registered = self._layouts.get(key)
            if registered is not None:
                if registered != namespace.layout:
                    raise InvalidArgument(_clash_message(namespace, registered))
                return False
            self._layouts[key] = namespace.layout
            if self._path is not None:
                self._save_locked()
        log.info("registered namespace %r (tenant %r, tp_rank %d): %s", namespace.name,
                 namespace.tenant, namespace.tp_rank, namespace.layout.describe())
        return True

    def _load(self) -> None:
        assert self._path is not None
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # A cache must come up even if its bookkeeping is damaged; layouts get
            # re-registered by the next Put of each namespace.
            log.error("ignoring unreadable namespace registry %s: %s", self._path, exc)
            return
        if not isinstance(data, dict) or data.get("version") != _FORMAT_VERSION:
            log.error("ignoring namespace registry %s: version %r, expected %d", self._path,
                      data.get("version") if isinstance(data, dict) else None, _FORMAT_VERSION)
            return
        for entry in data.get("namespaces", []):
            try:
                layout = KVLayout(**entry["layout"])
                key = (entry["tenant"], str(entry["name"]), int(entry["tp_rank"]))
            except (KeyError, TypeError, ValueError, InvalidArgument) as exc:
                log.error("skipping bad namespace registry entry %r: %s", entry, exc)
                continue
            self._layouts[key] = layout

    def _save_locked(self) -> None:
        assert self._path is not None
        entries = [
            {"tenant": tenant, "name": name, "tp_rank": rank, "layout": _layout_to_json(layout)}
            for (tenant, name, rank), layout in sorted(
                self._layouts.items(), key=lambda item: (item[0][0] or "", *item[0][1:]))
        ]
        text = json.dumps({"version": _FORMAT_VERSION, "namespaces": entries}, indent=1)
        _write_atomically(self._path, text.encode())


def _rope_name(layout: KVLayout) -> str:
    return "pre-RoPE" if layout.keys_pre_rope else "post-RoPE"


def _clash_message(namespace: Namespace, registered: KVLayout) -> str:
    if replace(registered, keys_pre_rope=namespace.layout.keys_pre_rope) == namespace.layout:
        return (
            f"namespace {namespace.name!r} (tp_rank {namespace.tp_rank}) holds "
            f"{_rope_name(registered)} keys, the request expects {_rope_name(namespace.layout)} "
            "keys; attention over them would be silently wrong. Use another namespace name "
            "(sparse decode stores pre-RoPE keys, transformers prefix reuse post-RoPE ones)"
        )
    return (
        f"namespace {namespace.name!r} (tp_rank {namespace.tp_rank}) is registered with layout "
        f"[{registered.describe()}], the request has [{namespace.layout.describe()}]; "
        "use another namespace name for another layout"
    )


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old or the new contents."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
