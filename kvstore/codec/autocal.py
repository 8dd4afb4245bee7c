"""Calibration without the user: which table a namespace's chunks are encoded with.

``table_for(model, layout, kv)`` answers, per (model, layout) in this process:

1. a table from ``kvstore calibrate`` in the user's data dir whose model and layout
   match (the newest): the user's own measurement wins;
2. else a table shipped with kvstore for that model fingerprint
   (``kvstore/codec/tables/*.json``: SmolLM2-135M, calibrated on pydoc text);
3. else a statistics-only table built from the namespace's first chunks
   (``stats_table``): no model is run, so it cannot measure what an error costs;
   it sets key steps from the keys' own per-channel statistics and keeps each
   level's default bins. It is rebuilt when the key statistics drift
   (``DRIFT_LOG_RMS``) from those it was built on.

A model fingerprint is the namespace's model name (the part before ``@``, without
an organisation prefix or an ``-instruct`` suffix, lower case) plus the layout's
layers, kv heads and head dim. Decoding never needs any of this: bins travel in
every section and objects record the table id.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from kvstore.codec.calibrate import (
    CalibrationTable,
    default_dir,
    load_table,
    make_table_from_bins,
)
from kvstore.codec.halfconv import to_float32
from kvstore.codec.levels import LEVELS
from kvstore.errors import KVStoreError
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)

STATS_CHUNKS = 1  # chunks a statistics-only table is built from (the first one itself)
# Key weight = per-channel key RMS ** KEY_RMS_POWER (geometric mean 1 per layer): the
# query a key channel meets grows with the key's own scale in RoPE models (see
# docs/design.md "calibration without the user" for the measurement on SmolLM2).
KEY_RMS_POWER = 0.5
# Rebuild a statistics-only table when the mean |log(key RMS / reference RMS)| over
# channels of a chunk exceeds this for DRIFT_CHUNKS chunks in a row.
DRIFT_LOG_RMS = 0.5
DRIFT_CHUNKS = 2


def model_key(name: str) -> str:
    """The model part of a namespace name: "HuggingFaceTB/SmolLM2-135M-Instruct@main"
    and "smollm2-135m" both give "smollm2-135m"."""
    key = name.split("@", 1)[0].rsplit("/", 1)[-1].lower()
    return key.removesuffix("-instruct")


def _geometry(table: CalibrationTable) -> tuple[int, int, int]:
    return table.num_layers, table.num_kv_heads, table.head_dim


def _matches(table: CalibrationTable, key: str, layout: KVLayout) -> bool:
    return (model_key(table.model) == key
            and _geometry(table) == (layout.num_layers, layout.num_kv_heads, layout.head_dim))


def shipped_tables() -> list[CalibrationTable]:
    """The tables packaged with kvstore (package data ``kvstore.codec.tables``)."""
    folder = resources.files("kvstore.codec") / "tables"
    out = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            with resources.as_file(entry) as path:
                out.append(load_table(path))
    return out


def user_table(key: str, layout: KVLayout, folder: Path | None = None
               ) -> CalibrationTable | None:
    """The newest table from ``kvstore calibrate`` for this fingerprint, or None.

    A table that does not load (damaged, an old format) is skipped with a warning:
    the encoder then falls back to the next source, it never fails a put for it.
    """
    folder = folder or default_dir()
    paths = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) \
        if folder.is_dir() else []
    for path in paths:
        try:
            table = load_table(path)
        except KVStoreError as exc:
            log.warning("skipping calibration table %s: %s", path, exc)
            continue
        if _matches(table, key, layout):
            return table
    return None


def key_stats(kv: np.ndarray, dtype: str) -> np.ndarray:
    """Per-layer, per-channel key RMS ``[layers, heads * head_dim]`` (float64) of a
    storage chunk ``[layers, 2, heads, tokens, dim]`` in ``dtype`` (bf16 as uint16)."""
    # Every 4th token: a quarter of the work, and 64 of a 256-token chunk's tokens
    # estimate an RMS within a few percent.
    keys = to_float32(np.ascontiguousarray(kv[:, 0, :, ::4]), dtype)  # [L, heads, T/4, dim]
    ms = np.square(keys).mean(axis=2, dtype=np.float64)  # [layers, heads, dim]
    return np.sqrt(ms).reshape(kv.shape[0], -1)


def stats_table(model: str, layout: KVLayout, rms: np.ndarray) -> CalibrationTable:
    """A statistics-only table: key weights from key RMS ``[layers, channels]``, each
    level's default bins everywhere (no model run, so no sensitivity to allocate by)."""
    floor = np.maximum(1e-3 * rms.max(axis=1, keepdims=True), 1e-12)  # silent channels
    w = np.maximum(rms, floor) ** KEY_RMS_POWER
    w = w / np.exp(np.log(w).mean(axis=1, keepdims=True))
    weights = [[float(f"{v:.4g}") for v in row] for row in w]
    bins = {lv.name: {"k": [lv.key_bins], "v": [lv.value_bins]}
            for lv in LEVELS.values() if lv.level_id}
    return make_table_from_bins(f"stats:{model_key(model)}", layout, layout.num_layers,
                                weights, bins)


@dataclass(slots=True)
class _StatsState:
    """A namespace's statistics-only calibration: chunks seen, reference statistics."""

    pending: list[np.ndarray] = field(default_factory=list)  # key RMS of chunks so far
    reference: np.ndarray | None = None  # log key RMS the table was built on
    table: CalibrationTable | None = None
    num_drifted: int = 0  # consecutive chunks beyond DRIFT_LOG_RMS
    num_rebuilds: int = 0


class AutoCalibration:
    """Per-(model, layout) choice of table; thread-safe, one per process by default."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self._data_dir = data_dir
        self._lock = threading.Lock()
        self._fixed: dict[tuple[str, tuple[int, ...]], CalibrationTable | None] = {}
        self._stats: dict[tuple[str, tuple[int, ...]], _StatsState] = {}

    def table_for(self, model: str, layout: KVLayout, kv: np.ndarray
                  ) -> CalibrationTable | None:
        """The table to encode chunk ``kv`` with (None: the level defaults, which a
        namespace's very first chunk of an unknown model gets while statistics
        accumulate)."""
        key = model_key(model)
        geometry = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
        with self._lock:
            if (key, geometry) not in self._fixed:
                self._fixed[key, geometry] = self._find_fixed(key, layout)
            fixed = self._fixed[key, geometry]
            if fixed is not None:
                return fixed
            state = self._stats.setdefault((key, geometry), _StatsState())
            return self._observe(state, model, layout, key_stats(kv, layout.dtype))

    def _find_fixed(self, key: str, layout: KVLayout) -> CalibrationTable | None:
        table = user_table(key, layout, self._data_dir)
        if table is None:
            table = next((t for t in shipped_tables() if _matches(t, key, layout)), None)
        if table is not None:
            log.info("kvq: model %s uses calibration table %016x (%s)", key, table.table_id,
                     table.model)
        return table

    def _observe(self, state: _StatsState, model: str, layout: KVLayout,
                 rms: np.ndarray) -> CalibrationTable | None:
        if state.table is not None:
            drift = float(np.abs(np.log(np.maximum(rms, 1e-12)) - state.reference).mean())
            state.num_drifted = state.num_drifted + 1 if drift > DRIFT_LOG_RMS else 0
            if state.num_drifted < DRIFT_CHUNKS:
                return state.table
            log.info("kvq: key statistics of %s drifted (%.2f); rebuilding its table",
                     model_key(model), drift)
            state.pending, state.table, state.num_drifted = [], None, 0
            state.num_rebuilds += 1
        state.pending.append(rms)
        if len(state.pending) < STATS_CHUNKS:
            return None
        mean = np.sqrt(np.mean(np.square(state.pending), axis=0))
        state.reference = np.log(np.maximum(mean, 1e-12))
        state.table = stats_table(model, layout, mean)
        state.pending = []
        return state.table

    def num_rebuilds(self, model: str, layout: KVLayout) -> int:
        """How often a statistics-only table of this fingerprint was rebuilt for drift."""
        geometry = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
        state = self._stats.get((model_key(model), geometry))
        return state.num_rebuilds if state else 0


_DEFAULT = AutoCalibration()


def table_for(model: str, layout: KVLayout, kv: np.ndarray) -> CalibrationTable | None:
    """The process-wide ``AutoCalibration.table_for``."""
    return _DEFAULT.table_for(model, layout, kv)
