"""SparseConfig: the knobs of sparse long-context decode, each with its unit and default."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.errors import InvalidArgument

SELECTORS = ("landmark", "lowrank", "two_stage", "dense")


@dataclass(frozen=True, slots=True)
class SparseConfig:
    """How shadows are built at prefill and how chunks are chosen at each decode step.

    ``budget_tokens`` counts every token a sparse layer attends exactly: the sink,
    the outlier blocks, the local window (sealed blocks plus the unsealed tail,
    reserved at its largest) and the selected blocks. With ``summarize_unselected``
    every other sealed block adds one approximate term (see the field).
    """

    budget_tokens: int = 512  # tokens attended per sparse layer and kv head
    block_tokens: int = 8  # selection unit (DESIGN §2 "sparse units")
    rank: int | None = None  # low-rank factor rank; None = a quarter of Hkv * head_dim
    selector: str = "two_stage"  # one of SELECTORS
    candidate_factor: int = 8  # two-stage: landmarks keep this many x the final blocks
    sink_blocks: int = 1  # leading blocks always attended (the attention sink)
    local_blocks: int = 4  # most recent sealed blocks always attended, exact
    outlier_blocks: int = 4  # per kv head, blocks least like their landmark, kept exact
    dense_layers: int = 2  # the first layers attend everything, exactly
    store_dtype: str = "float16"  # dtype of values and exact keys in the block store
    # Selected blocks' exact keys are fetched with their values (twice the bytes);
    # False rebuilds them from the rank-r factors as ShadowKV does. The factors
    # always drive selection. At rank 48 on SmolLM2 the rebuild alone added ~0.05
    # to the attention-output error (bench/README.md, "Sparse decode").
    exact_keys: bool = True
    # Unselected blocks also enter attention, one term each: the block's landmark as
    # key, its mean value as value, weighted as block_tokens tokens. Computed from the
    # shadow (nothing fetched) and not counted in budget_tokens, which counts the
    # tokens attended exactly.
    summarize_unselected: bool = True

    def __post_init__(self) -> None:
        if self.selector not in SELECTORS:
            raise InvalidArgument(f"selector must be one of {SELECTORS}, got {self.selector!r}")
        if self.block_tokens <= 0 or self.block_tokens & (self.block_tokens - 1):
            raise InvalidArgument(f"block_tokens must be a power of 2, got {self.block_tokens}")
        for name in ("sink_blocks", "local_blocks", "outlier_blocks", "dense_layers"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.candidate_factor < 1:
            raise InvalidArgument(f"candidate_factor must be >= 1, got {self.candidate_factor}")
        if self.rank is not None and self.rank <= 0:
            raise InvalidArgument(f"rank must be positive or None, got {self.rank}")
        if self.selector != "dense" and self.num_selected_blocks < 1:
            raise InvalidArgument(
                f"budget_tokens={self.budget_tokens} leaves no room for selected blocks after "
                f"{self.reserved_tokens} reserved tokens (sink, outliers, local window, tail)")

    @property
    def reserved_tokens(self) -> int:
        """Tokens attended regardless of selection; the tail is reserved at its largest."""
        blocks = self.sink_blocks + self.outlier_blocks + self.local_blocks + 1
        return blocks * self.block_tokens

    @property
    def num_selected_blocks(self) -> int:
        """k of top-k: what the budget leaves for selected blocks."""
        return (self.budget_tokens - self.reserved_tokens) // self.block_tokens

    def rank_for(self, key_width: int) -> int:
        """The factor rank for pre-RoPE keys ``key_width`` = Hkv * head_dim wide."""
        return min(key_width, self.rank if self.rank is not None else max(1, key_width // 4))
