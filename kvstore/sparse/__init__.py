"""ShadowKV-style sparse long-context decode: shadows in the client, values from the store.

``generate`` is the one-call entry point; the pieces below are for engines that
run their own loop (see docs in each module).
"""

from kvstore.sparse.blocks import (
    KIND_KEY,
    KIND_VALUE,
    ArenaBlockSource,
    BlockFetcher,
    BlockGeometry,
    BlockSource,
    BlockStore,
    HostBlockPool,
    RemoteBlockSource,
    SplitBlockSource,
)
from kvstore.sparse.config import SparseConfig
from kvstore.sparse.decoder import SparseDecoder, build_sequence
from kvstore.sparse.generate import generate, open_decoder
from kvstore.sparse.shadow import LayerShadow, ShadowBundle
from kvstore.sparse.store import (
    DaemonSequenceStore,
    HostSequenceStore,
    SequenceStore,
    sequence_kind,
)

__all__ = [
    "KIND_KEY", "KIND_VALUE", "ArenaBlockSource", "BlockFetcher", "BlockGeometry", "BlockSource",
    "BlockStore", "DaemonSequenceStore", "HostBlockPool", "HostSequenceStore", "LayerShadow",
    "RemoteBlockSource", "SequenceStore", "ShadowBundle", "SparseConfig", "SparseDecoder",
    "SplitBlockSource", "build_sequence", "generate", "open_decoder", "sequence_kind",
]
