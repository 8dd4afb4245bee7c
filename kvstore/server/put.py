"""Assembly of a Put stream: header first, then chunk objects split into ordered parts."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import InvalidArgument
from kvstore.keys import ChunkKey, Namespace
from kvstore.server.objects import max_object_bytes


@dataclass(frozen=True, slots=True)
class ChunkObject:
    """One complete object of a Put stream, ready to verify and store."""

    index: int  # chunk index within the sequence
    key: ChunkKey  # computed by the daemon from the namespace and tokens
    data: bytes  # the KVC1 object as the client sent it


@dataclass(slots=True)
class PutAssembler:
    """Checks the order of PutChunk messages and joins the parts of each chunk.

    Invariants: chunk indexes strictly increase, lie in [first_chunk, num_chunks),
    and the parts of one chunk arrive together, ending with ``last_part``.
    """

    namespace: Namespace
    position_free: bool
    keys: list[ChunkKey]  # one per full chunk of the sequence (one if position-free)
    first_chunk: int  # chunks before it are not sent
    num_tokens: int  # tokens per chunk object
    max_object_bytes: int  # larger objects are refused before they are buffered whole
    _parts: list[bytes] = field(default_factory=list)
    _part_bytes: int = 0
    _current: int | None = None  # chunk whose parts are arriving
    _last_done: int = -1  # last completed chunk index

    @classmethod
    def from_header(cls, header: pb.PutHeader, namespace: Namespace, keys: list[ChunkKey],
                    num_tokens: int) -> PutAssembler:
        """The assembler of a stream whose header addresses ``keys`` (hashed by the caller,
        off the event loop) of ``num_tokens`` tokens each."""
        if header.first_chunk > len(keys):
            raise InvalidArgument(f"first_chunk is {header.first_chunk}, the sequence has only "
                                  f"{len(keys)} full chunks")
        return cls(namespace=namespace, position_free=header.position_free, keys=keys,
                   first_chunk=header.first_chunk, num_tokens=num_tokens,
                   max_object_bytes=max_object_bytes(namespace, num_tokens))

    @property
    def num_chunks(self) -> int:
        return len(self.keys)

    def add(self, chunk: pb.PutChunk) -> ChunkObject | None:
        """Take one part; returns the chunk's object when this part completes it."""
        index = chunk.chunk_index
        if self._current is None:
            self._start(index)
        elif index != self._current:
            raise InvalidArgument(f"chunk {index} started before chunk {self._current} got its "
                                  "last_part; parts of a chunk must be consecutive")
        part = chunk.object_part  # upb copies a bytes field on every access: read it once
        self._part_bytes += len(part)
        if self._part_bytes > self.max_object_bytes:
            raise InvalidArgument(
                f"chunk {index}: object is over {self.max_object_bytes} bytes (seen "
                f"{self._part_bytes} so far), the most a {self.num_tokens}-token chunk of "
                f"this layout can take"
            )
        self._parts.append(part)
        if not chunk.last_part:
            return None
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts, self._part_bytes, self._current = [], 0, None
        self._last_done = index
        return ChunkObject(index=index, key=self.keys[index], data=data)

    def finish(self) -> None:
        """Called at the end of the stream: a chunk without its last part is an error."""
        if self._current is not None:
            raise InvalidArgument(f"the stream ended before chunk {self._current} got its "
                                  "last_part")

    def _start(self, index: int) -> None:
        if index >= self.num_chunks:
            what = ("a position-free Put has one chunk (index 0)" if self.position_free else
                    f"the tokens hold {self.num_chunks} full chunks of "
                    f"{self.namespace.layout.chunk_tokens}")
            raise InvalidArgument(f"chunk_index {index} is out of range: {what}")
        if index < self.first_chunk:
            raise InvalidArgument(f"chunk_index {index} is before first_chunk "
                                  f"{self.first_chunk}")
        if index <= self._last_done:
            raise InvalidArgument(f"chunk_index {index} after chunk {self._last_done}: indexes "
                                  "must increase")
        self._current = index
