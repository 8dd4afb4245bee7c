"""FetchBlocks: slicing sparse-decoder blocks out of stored raw chunk objects.

A block is ``block_tokens`` consecutive tokens of one (layer, K|V, kv head). Block
``b`` covers tokens ``[b * T, (b + 1) * T)`` of the sequence, so it lies in chunk
``b * T // chunk_tokens`` (T divides chunk_tokens, so never across two chunks).
A call loads each chunk it needs once, however many blocks it asks of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore.codec.raw import raw_payload
from kvstore.errors import Corrupt, InvalidArgument, NotFound
from kvstore.keys import ChunkKey
from kvstore.layout import KVLayout

MAX_BLOCKS_PER_CALL = 1 << 16
DEFAULT_BLOCK_TOKENS = 8
KIND_NAMES = ("K", "V")  # index = FetchBlocksRequest.kind


@dataclass(frozen=True, slots=True)
class BlockBatch:
    """A validated FetchBlocks request: every block lies in the sequence's whole chunks."""

    layout: KVLayout
    layer: int
    kind: int  # 0 keys, 1 values
    block_tokens: int  # divides layout.chunk_tokens
    heads: np.ndarray  # [n] int64, each < num_kv_heads
    blocks: np.ndarray  # [n] int64, each < num_chunks * blocks_per_chunk

    @property
    def blocks_per_chunk(self) -> int:
        return self.layout.chunk_tokens // self.block_tokens

    @property
    def block_bytes(self) -> int:
        return self.block_tokens * self.layout.head_dim * self.layout.itemsize

    @property
    def num_bytes(self) -> int:
        return len(self.blocks) * self.block_bytes


def batch_from_proto(request: pb.FetchBlocksRequest, layout: KVLayout,
                     num_chunks: int) -> BlockBatch:
    """Validate a request against the namespace layout and the sequence's whole chunks.

    Raises:
        InvalidArgument: a field out of range, naming it with what was expected.
    """
    if request.layer >= layout.num_layers:
        raise InvalidArgument(f"layer {request.layer} out of range: the layout has "
                              f"{layout.num_layers} layers")
    if request.kind >= len(KIND_NAMES):
        raise InvalidArgument(f"kind must be 0 (K) or 1 (V), got {request.kind}")
    block_tokens = request.block_tokens or DEFAULT_BLOCK_TOKENS
    if layout.chunk_tokens % block_tokens:
        raise InvalidArgument(f"block_tokens {block_tokens} does not divide chunk_tokens "
                              f"{layout.chunk_tokens}")
    if len(request.heads) != len(request.blocks):
        raise InvalidArgument(f"heads has {len(request.heads)} entries and blocks "
                              f"{len(request.blocks)}; they pair up, so must match")
    if len(request.blocks) > MAX_BLOCKS_PER_CALL:
        raise InvalidArgument(f"{len(request.blocks)} blocks asked, at most "
                              f"{MAX_BLOCKS_PER_CALL} per call")
    heads = np.asarray(request.heads, dtype=np.int64)
    blocks = np.asarray(request.blocks, dtype=np.int64)
    _check_below(heads, layout.num_kv_heads, "head", f"the layout has "
                 f"{layout.num_kv_heads} kv heads")
    num_blocks = num_chunks * (layout.chunk_tokens // block_tokens)
    _check_below(blocks, num_blocks, "block", f"the tokens hold {num_chunks} whole chunks, "
                 f"{num_blocks} blocks of {block_tokens} tokens")
    return BlockBatch(layout, request.layer, request.kind, block_tokens, heads, blocks)


def _check_below(values: np.ndarray, limit: int, name: str, why: str) -> None:
    bad = np.flatnonzero(values >= limit)
    if bad.size:
        i = int(bad[0])
        raise InvalidArgument(f"{name}s[{i}] = {int(values[i])} out of range: {why}")


def chunks_needed(batch: BlockBatch) -> list[int]:
    """Indexes of the chunks holding the batch's blocks, ascending, each once."""
    return np.unique(batch.blocks // batch.blocks_per_chunk).tolist()


def fetch_blocks(batch: BlockBatch, keys: Sequence[ChunkKey],
                 load: Callable[[ChunkKey], bytes | None]) -> bytes:
    """The batch's blocks concatenated in request order (runs on the I/O pool).

    ``keys[c]`` is the key of chunk ``c``; ``load`` returns its raw KVC1 object, or
    None when it is not stored (or was dropped as corrupt).

    Raises:
        NotFound: a chunk holding a requested block is not stored.
    """
    out = np.empty((len(batch.blocks), batch.block_bytes), dtype=np.uint8)
    chunk_of = batch.blocks // batch.blocks_per_chunk
    for chunk in chunks_needed(batch):
        raw = load(keys[chunk])
        if raw is None:
            first = chunk * batch.layout.chunk_tokens
            raise NotFound(f"chunk {chunk} (tokens {first}..{first + batch.layout.chunk_tokens})"
                           f" is not stored; its blocks cannot be fetched")
        rows = _block_rows(raw, batch, chunk)  # [heads, blocks_per_chunk, block_bytes]
        picked = np.flatnonzero(chunk_of == chunk)
        local = batch.blocks[picked] - chunk * batch.blocks_per_chunk
        out[picked] = rows[batch.heads[picked], local]
    return out.tobytes()


def _block_rows(raw: bytes, batch: BlockBatch, chunk: int) -> np.ndarray:
    """The (layer, kind) section of a raw object as ``[heads, blocks, block_bytes]`` bytes."""
    header, payload = raw_payload(raw, verify=False)  # verified by stored_to_raw
    layout = batch.layout
    want = (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype,
            layout.chunk_tokens)
    got = (header.num_layers, header.num_kv_heads, header.head_dim, header.dtype,
           header.num_tokens)
    if got != want:  # Put checks every object against the namespace, so a bug or forgery
        raise Corrupt(f"stored chunk {chunk} has layout {got}, the namespace wants {want}")
    # payload: [layers, 2, heads, chunk_tokens, head_dim] elements, as bytes
    sections = np.frombuffer(payload, dtype=np.uint8).reshape(
        layout.num_layers, 2, layout.num_kv_heads, batch.blocks_per_chunk, batch.block_bytes)
    return sections[batch.layer, batch.kind]
