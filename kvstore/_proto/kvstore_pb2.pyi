from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    CODEC_RAW: _ClassVar[Codec]
    CODEC_KVQ: _ClassVar[Codec]

class Order(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ORDER_UNSPECIFIED: _ClassVar[Order]
    ORDER_CHUNK_MAJOR: _ClassVar[Order]
    ORDER_LAYER_MAJOR: _ClassVar[Order]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT32: DType
CODEC_UNSPECIFIED: Codec
CODEC_RAW: Codec
CODEC_KVQ: Codec
ORDER_UNSPECIFIED: Order
ORDER_CHUNK_MAJOR: Order
ORDER_LAYER_MAJOR: Order

class Layout(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "dtype", "chunk_tokens", "keys_pre_rope")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEYS_PRE_ROPE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: DType
    chunk_tokens: int
    keys_pre_rope: bool
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., chunk_tokens: _Optional[int] = ..., keys_pre_rope: _Optional[bool] = ...) -> None: ...

class Namespace(_message.Message):
    __slots__ = ("name", "layout", "tp_rank")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    name: str
    layout: Layout
    tp_rank: int
    def __init__(self, name: _Optional[str] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., tp_rank: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("namespace", "tokens_le_i32", "position_free")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_LE_I32_FIELD_NUMBER: _ClassVar[int]
    POSITION_FREE_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    tokens_le_i32: bytes
    position_free: bool
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tokens_le_i32: _Optional[bytes] = ..., position_free: _Optional[bool] = ...) -> None: ...

class TierHits(_message.Message):
    __slots__ = ("tier", "num_tokens")
    TIER_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tier: str
    num_tokens: int
    def __init__(self, tier: _Optional[str] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("num_tokens", "tiers")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierHits]
    def __init__(self, num_tokens: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierHits, _Mapping]]] = ...) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("namespace", "tokens_le_i32", "first_chunk", "position_free")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_LE_I32_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    POSITION_FREE_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    tokens_le_i32: bytes
    first_chunk: int
    position_free: bool
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tokens_le_i32: _Optional[bytes] = ..., first_chunk: _Optional[int] = ..., position_free: _Optional[bool] = ...) -> None: ...

class PutChunk(_message.Message):
    __slots__ = ("chunk_index", "object_part", "last_part")
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    OBJECT_PART_FIELD_NUMBER: _ClassVar[int]
    LAST_PART_FIELD_NUMBER: _ClassVar[int]
    chunk_index: int
    object_part: bytes
    last_part: bool
    def __init__(self, chunk_index: _Optional[int] = ..., object_part: _Optional[bytes] = ..., last_part: _Optional[bool] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    chunk: PutChunk
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., chunk: _Optional[_Union[PutChunk, _Mapping]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("num_chunks_stored", "num_chunks_present")
    NUM_CHUNKS_STORED_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_PRESENT_FIELD_NUMBER: _ClassVar[int]
    num_chunks_stored: int
    num_chunks_present: int
    def __init__(self, num_chunks_stored: _Optional[int] = ..., num_chunks_present: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace", "tokens_le_i32", "order", "layers", "encoded", "position_free", "max_response_bytes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_LE_I32_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    POSITION_FREE_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    tokens_le_i32: bytes
    order: Order
    layers: _containers.RepeatedScalarFieldContainer[int]
    encoded: bool
    position_free: bool
    max_response_bytes: int
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tokens_le_i32: _Optional[bytes] = ..., order: _Optional[_Union[Order, str]] = ..., layers: _Optional[_Iterable[int]] = ..., encoded: _Optional[bool] = ..., position_free: _Optional[bool] = ..., max_response_bytes: _Optional[int] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("chunk_index", "layer", "data", "checksum_xxh3", "num_chunks", "num_chunks_in_data")
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_XXH3_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_IN_DATA_FIELD_NUMBER: _ClassVar[int]
    chunk_index: int
    layer: int
    data: bytes
    checksum_xxh3: int
    num_chunks: int
    num_chunks_in_data: int
    def __init__(self, chunk_index: _Optional[int] = ..., layer: _Optional[int] = ..., data: _Optional[bytes] = ..., checksum_xxh3: _Optional[int] = ..., num_chunks: _Optional[int] = ..., num_chunks_in_data: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("namespace", "tokens_le_i32", "position_free")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_LE_I32_FIELD_NUMBER: _ClassVar[int]
    POSITION_FREE_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    tokens_le_i32: bytes
    position_free: bool
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tokens_le_i32: _Optional[bytes] = ..., position_free: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("num_chunks_deleted",)
    NUM_CHUNKS_DELETED_FIELD_NUMBER: _ClassVar[int]
    num_chunks_deleted: int
    def __init__(self, num_chunks_deleted: _Optional[int] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("namespace", "tokens_le_i32")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_LE_I32_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    tokens_le_i32: bytes
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tokens_le_i32: _Optional[bytes] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("num_chunks_promoted", "num_chunks_resident")
    NUM_CHUNKS_PROMOTED_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    num_chunks_promoted: int
    num_chunks_resident: int
    def __init__(self, num_chunks_promoted: _Optional[int] = ..., num_chunks_resident: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "used_bytes", "capacity_bytes", "num_objects", "hits", "misses", "evictions", "corrupt", "errors", "puts", "read_bytes", "written_bytes", "info")
    class InfoEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    name: str
    used_bytes: int
    capacity_bytes: int
    num_objects: int
    hits: int
    misses: int
    evictions: int
    corrupt: int
    errors: int
    puts: int
    read_bytes: int
    written_bytes: int
    info: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., used_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., num_objects: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., corrupt: _Optional[int] = ..., errors: _Optional[int] = ..., puts: _Optional[int] = ..., read_bytes: _Optional[int] = ..., written_bytes: _Optional[int] = ..., info: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("tiers", "uptime_ms", "version", "requests", "failed_requests")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    uptime_ms: int
    version: str
    requests: int
    failed_requests: int
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., uptime_ms: _Optional[int] = ..., version: _Optional[str] = ..., requests: _Optional[int] = ..., failed_requests: _Optional[int] = ...) -> None: ...

class AttachArenaRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AttachArenaResponse(_message.Message):
    __slots__ = ("path", "file_bytes", "nonce", "boot_id", "lease_ttl_ms", "hugepages")
    PATH_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    HUGEPAGES_FIELD_NUMBER: _ClassVar[int]
    path: str
    file_bytes: int
    nonce: bytes
    boot_id: str
    lease_ttl_ms: int
    hugepages: str
    def __init__(self, path: _Optional[str] = ..., file_bytes: _Optional[int] = ..., nonce: _Optional[bytes] = ..., boot_id: _Optional[str] = ..., lease_ttl_ms: _Optional[int] = ..., hugepages: _Optional[str] = ...) -> None: ...

class LeaseChunksRequest(_message.Message):
    __slots__ = ("namespace", "tokens_le_i32", "position_free", "ttl_ms", "arena_nonce")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_LE_I32_FIELD_NUMBER: _ClassVar[int]
    POSITION_FREE_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    ARENA_NONCE_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    tokens_le_i32: bytes
    position_free: bool
    ttl_ms: int
    arena_nonce: bytes
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tokens_le_i32: _Optional[bytes] = ..., position_free: _Optional[bool] = ..., ttl_ms: _Optional[int] = ..., arena_nonce: _Optional[bytes] = ...) -> None: ...

class ChunkExtent(_message.Message):
    __slots__ = ("offset_bytes", "length_bytes")
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    LENGTH_BYTES_FIELD_NUMBER: _ClassVar[int]
    offset_bytes: int
    length_bytes: int
    def __init__(self, offset_bytes: _Optional[int] = ..., length_bytes: _Optional[int] = ...) -> None: ...

class LeaseChunksResponse(_message.Message):
    __slots__ = ("lease_id", "ttl_ms", "extents", "num_chunks_stored")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_STORED_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    ttl_ms: int
    extents: _containers.RepeatedCompositeFieldContainer[ChunkExtent]
    num_chunks_stored: int
    def __init__(self, lease_id: _Optional[int] = ..., ttl_ms: _Optional[int] = ..., extents: _Optional[_Iterable[_Union[ChunkExtent, _Mapping]]] = ..., num_chunks_stored: _Optional[int] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    def __init__(self, lease_id: _Optional[int] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReserveExtentsRequest(_message.Message):
    __slots__ = ("namespace", "tokens_le_i32", "position_free", "first_chunk", "object_bytes", "ttl_ms", "arena_nonce")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_LE_I32_FIELD_NUMBER: _ClassVar[int]
    POSITION_FREE_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    OBJECT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    ARENA_NONCE_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    tokens_le_i32: bytes
    position_free: bool
    first_chunk: int
    object_bytes: _containers.RepeatedScalarFieldContainer[int]
    ttl_ms: int
    arena_nonce: bytes
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tokens_le_i32: _Optional[bytes] = ..., position_free: _Optional[bool] = ..., first_chunk: _Optional[int] = ..., object_bytes: _Optional[_Iterable[int]] = ..., ttl_ms: _Optional[int] = ..., arena_nonce: _Optional[bytes] = ...) -> None: ...

class ReserveExtentsResponse(_message.Message):
    __slots__ = ("reservation_id", "ttl_ms", "extents")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: int
    ttl_ms: int
    extents: _containers.RepeatedCompositeFieldContainer[ChunkExtent]
    def __init__(self, reservation_id: _Optional[int] = ..., ttl_ms: _Optional[int] = ..., extents: _Optional[_Iterable[_Union[ChunkExtent, _Mapping]]] = ...) -> None: ...

class CommitExtentsRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: int
    def __init__(self, reservation_id: _Optional[int] = ...) -> None: ...

class CommitExtentsResponse(_message.Message):
    __slots__ = ("num_chunks_stored", "num_chunks_present")
    NUM_CHUNKS_STORED_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_PRESENT_FIELD_NUMBER: _ClassVar[int]
    num_chunks_stored: int
    num_chunks_present: int
    def __init__(self, num_chunks_stored: _Optional[int] = ..., num_chunks_present: _Optional[int] = ...) -> None: ...

class LeaseGpuChunksRequest(_message.Message):
    __slots__ = ("namespace", "tokens_le_i32", "position_free", "ttl_ms")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_LE_I32_FIELD_NUMBER: _ClassVar[int]
    POSITION_FREE_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    tokens_le_i32: bytes
    position_free: bool
    ttl_ms: int
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tokens_le_i32: _Optional[bytes] = ..., position_free: _Optional[bool] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class GpuChunkExtent(_message.Message):
    __slots__ = ("offset_bytes", "length_bytes", "device_checksum")
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    LENGTH_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    offset_bytes: int
    length_bytes: int
    device_checksum: int
    def __init__(self, offset_bytes: _Optional[int] = ..., length_bytes: _Optional[int] = ..., device_checksum: _Optional[int] = ...) -> None: ...

class LeaseGpuChunksResponse(_message.Message):
    __slots__ = ("lease_id", "ttl_ms", "extents", "num_chunks_stored", "ipc_handle", "pci_bus_id", "slab_bytes", "slab_nonce", "boot_id")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_STORED_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    SLAB_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLAB_NONCE_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    ttl_ms: int
    extents: _containers.RepeatedCompositeFieldContainer[GpuChunkExtent]
    num_chunks_stored: int
    ipc_handle: bytes
    pci_bus_id: str
    slab_bytes: int
    slab_nonce: bytes
    boot_id: str
    def __init__(self, lease_id: _Optional[int] = ..., ttl_ms: _Optional[int] = ..., extents: _Optional[_Iterable[_Union[GpuChunkExtent, _Mapping]]] = ..., num_chunks_stored: _Optional[int] = ..., ipc_handle: _Optional[bytes] = ..., pci_bus_id: _Optional[str] = ..., slab_bytes: _Optional[int] = ..., slab_nonce: _Optional[bytes] = ..., boot_id: _Optional[str] = ...) -> None: ...

class FetchBlocksRequest(_message.Message):
    __slots__ = ("namespace", "tokens_le_i32", "layer", "kind", "block_tokens", "heads", "blocks")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_LE_I32_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    tokens_le_i32: bytes
    layer: int
    kind: int
    block_tokens: int
    heads: _containers.RepeatedScalarFieldContainer[int]
    blocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tokens_le_i32: _Optional[bytes] = ..., layer: _Optional[int] = ..., kind: _Optional[int] = ..., block_tokens: _Optional[int] = ..., heads: _Optional[_Iterable[int]] = ..., blocks: _Optional[_Iterable[int]] = ...) -> None: ...

class FetchBlocksResponse(_message.Message):
    __slots__ = ("data", "block_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    block_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., block_bytes: _Optional[int] = ...) -> None: ...

class PutBlobRequest(_message.Message):
    __slots__ = ("namespace", "tokens_le_i32", "kind", "data")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_LE_I32_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    tokens_le_i32: bytes
    kind: str
    data: bytes
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tokens_le_i32: _Optional[bytes] = ..., kind: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutBlobResponse(_message.Message):
    __slots__ = ("num_blobs_replaced",)
    NUM_BLOBS_REPLACED_FIELD_NUMBER: _ClassVar[int]
    num_blobs_replaced: int
    def __init__(self, num_blobs_replaced: _Optional[int] = ...) -> None: ...

class GetBlobRequest(_message.Message):
    __slots__ = ("namespace", "tokens_le_i32", "kind")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_LE_I32_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    tokens_le_i32: bytes
    kind: str
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tokens_le_i32: _Optional[bytes] = ..., kind: _Optional[str] = ...) -> None: ...

class GetBlobResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
