"""KVLayout: the shape and dtype of one model's KV, and the chunk size it is stored in."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.errors import InvalidArgument

# Canonical dtype names -> bytes per element. Wire codes live in codec.format.
DTYPE_ITEMSIZE: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}

_MAX_DIM = 1 << 16  # every layout field fits the object header's u16/u32 fields


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shape of one chunk: ``[num_layers, 2, num_kv_heads, chunk_tokens, head_dim]``.

    The canonical order (layers, K|V, heads, tokens, head dim) is the one the public
    API takes and returns.
    """

    num_layers: int  # transformer layers holding KV
    num_kv_heads: int  # KV heads per layer (after GQA grouping)
    head_dim: int  # elements per head
    dtype: str = "float16"  # one of DTYPE_ITEMSIZE
    chunk_tokens: int = 256  # tokens per stored chunk; a partial last chunk is not stored
    # Keys stored before RoPE (sparse decode, DESIGN §6) rather than rotated to their
    # positions (transformers prefix reuse, the default). The daemon registers it with
    # the rest of the layout, so a client expecting the other kind is refused.
    keys_pre_rope: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "chunk_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgument(f"KVLayout.{name} must be a positive int, got {value!r}")
            if value >= _MAX_DIM and name != "chunk_tokens":
                raise InvalidArgument(f"KVLayout.{name} must be < {_MAX_DIM}, got {value}")
        if self.chunk_tokens > 1 << 20:
            raise InvalidArgument(
                f"KVLayout.chunk_tokens must be <= 2**20, got {self.chunk_tokens}"
            )
        if not isinstance(self.keys_pre_rope, bool):
            raise InvalidArgument(
                f"KVLayout.keys_pre_rope must be a bool, got {self.keys_pre_rope!r}")
        if self.dtype not in DTYPE_ITEMSIZE:
            raise InvalidArgument(
                f"KVLayout.dtype must be one of {sorted(DTYPE_ITEMSIZE)}, got {self.dtype!r}"
            )

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return DTYPE_ITEMSIZE[self.dtype]

    def shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Canonical tensor shape for ``num_tokens`` tokens."""
        return (self.num_layers, 2, self.num_kv_heads, num_tokens, self.head_dim)

    @property
    def chunk_shape(self) -> tuple[int, int, int, int, int]:
        return self.shape(self.chunk_tokens)

    @property
    def section_bytes(self) -> int:
        """Bytes of one (layer, K|V) section of a full chunk: ``[heads, tokens, dim]``."""
        return self.num_kv_heads * self.chunk_tokens * self.head_dim * self.itemsize

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one full chunk, uncompressed."""
        return 2 * self.num_layers * self.section_bytes

    def describe(self) -> str:
        return (
            f"layers={self.num_layers} kv_heads={self.num_kv_heads} head_dim={self.head_dim} "
            f"dtype={self.dtype} chunk_tokens={self.chunk_tokens}"
            f" keys={'pre' if self.keys_pre_rope else 'post'}-RoPE"
        )
