"""The decoders of stored bytes, fed random and forged input: Corrupt (a miss), never a crash.

Covers the KVC1 object format (raw and kvq objects), the client's hand-written
GetResponse parser, the blob-part manifest and the client's reassembly of parted
blobs (against a real daemon), and the
sparse shadow bundle. "Forged" means mutated and then resealed with a valid
checksum, as anyone who can write a Redis value or a disk file could: the checksum
is no defence there, the parser's own checks are. Every call is also bounded in
what it allocates (traced by tracemalloc, numpy included).
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore import _frames as frames
from kvstore import codec
from kvstore._proto import kvstore_pb2 as pb
from kvstore.client import Client
from kvstore.client import _protocol as proto
from kvstore.client._blobs import MANIFEST_BYTES, PartManifest, part_kind
from kvstore.codec.format import HEADER_BYTES, compute_checksum, parse_object
from kvstore.codec.raw import decode_raw, encode_raw
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.layout import KVLayout
from kvstore.sparse.shadow import ShadowBundle
from tests.conftest import make_kv
from tests.fuzz.conftest import METADATA, TOKEN

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", chunk_tokens=8)
RAW = encode_raw(make_kv(LAYOUT, 8), LAYOUT)
KVQ = codec.encode(make_kv(LAYOUT, 8), LAYOUT, "balanced")
codec.decode(KVQ)  # compile the kvq decoder (numba) before any allocation is measured
PEAK_FACTOR, PEAK_SLACK_BYTES = 8, 4 << 20  # a decoder may allocate 8x its input + 4 MiB
FUZZ = settings(max_examples=60, deadline=5_000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def bounded(fn: Callable[[], Any], input_bytes: int) -> Any:
    """Run ``fn``; fail if it allocated more than the bound for ``input_bytes`` of input."""
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        return fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if not started:
            tracemalloc.stop()
        assert peak <= PEAK_FACTOR * input_bytes + PEAK_SLACK_BYTES, \
            f"decoding {input_bytes} bytes allocated {peak} bytes"


@st.composite
def mutated(draw: Any, valid: bytes) -> bytes:
    """``valid`` with a few bytes overwritten (header fields favoured), maybe cut or grown."""
    out = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        hi = min(len(out), HEADER_BYTES + 64) if draw(st.booleans()) else len(out)
        pos = draw(st.integers(0, hi - 1))
        width = draw(st.sampled_from([1, 2, 4, 8]))
        out[pos:pos + width] = draw(st.binary(min_size=width, max_size=width))
    cut = draw(st.sampled_from(["none", "cut", "grow"]))
    if cut == "cut":
        del out[draw(st.integers(0, len(out))):]
    elif cut == "grow":
        out += draw(st.binary(max_size=64))
    return bytes(out)


def reseal(data: bytes) -> bytes:
    """Recompute a KVC1 object's checksum, as a forger would."""
    if len(data) < HEADER_BYTES:
        return data
    return data[:40] + struct.pack("<Q", compute_checksum(data)) + data[HEADER_BYTES:]


def kvc1_inputs(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=256), mutated(valid), mutated(valid).map(reseal))


# ------------------------------------------------------------ KVC1 objects

@FUZZ
@given(kvc1_inputs(RAW))
def test_raw_objects_decode_exactly_or_raise_corrupt(data: bytes) -> None:
    try:
        header, arr = bounded(lambda: decode_raw(data), len(data))
    except (Corrupt, InvalidArgument):  # InvalidArgument: a valid object of another codec
        return
    assert arr.shape == (header.num_layers, 2, header.num_kv_heads, header.num_tokens,
                         header.head_dim)
    assert arr.nbytes < len(data)


@FUZZ
@given(kvc1_inputs(RAW))
def test_object_parser_splits_only_within_the_object(data: bytes) -> None:
    try:
        obj = bounded(lambda: parse_object(data), len(data))
    except Corrupt:
        return
    assert sum(s.nbytes for s in obj.sections) + obj.meta.nbytes <= len(data) - HEADER_BYTES


@settings(FUZZ, max_examples=30)
@given(kvc1_inputs(KVQ))
def test_kvq_objects_decode_finite_or_raise_corrupt(data: bytes) -> None:
    try:
        out = bounded(lambda: codec.decode(data), len(data))
    except (Corrupt, InvalidArgument):
        return
    assert torch.isfinite(out.float()).all()


# ------------------------------------------------------------ GetResponse frames

VALID_FRAME = frames.get_response(chunk_index=3, data=b"x" * 100, num_chunks=7, layer=1,
                                  checksum_xxh3=12345)


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated(VALID_FRAME)))
def test_get_response_parser_raises_only_corrupt(data: bytes) -> None:
    try:
        msg = bounded(lambda: frames.parse_get_response(data), len(data))
    except Corrupt:
        return
    assert msg.data.nbytes <= len(data)


# ------------------------------------------------------------ blob manifests and parts

def _manifest_reseal(data: bytes) -> bytes:
    if len(data) != MANIFEST_BYTES:
        return data
    return data[:40] + struct.pack("<Q", xxhash.xxh3_64_intdigest(data[:40]))


@st.composite
def forged_manifests(draw: Any) -> bytes:
    """Manifests with any field values and a valid checksum."""
    fields = [draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 300))) for _ in range(4)]
    body = struct.pack("<4sHHQQQQ", b"KVBP", 1, 0, *fields)
    return _manifest_reseal(body + b"\0" * 8)


@FUZZ
@given(st.one_of(st.binary(max_size=64), mutated(PartManifest(300, 128, 3, 0).to_bytes())
                 .map(_manifest_reseal), forged_manifests()))
def test_blob_manifest_parser_raises_only_corrupt(data: bytes) -> None:
    try:
        manifest = PartManifest.from_bytes(data)
    except Corrupt:
        return
    assert manifest.num_parts * manifest.part_bytes >= manifest.total_bytes


@pytest.fixture(scope="module")
def blob_client(fuzz_server: Any) -> Any:
    with Client(fuzz_server.address, "fuzz-blobs", LAYOUT, token=TOKEN) as client:
        yield client


def _put_raw_blob(client: Any, kind: str, data: bytes) -> None:
    """Store ``data`` under ``kind`` as one blob, as a writer of forged bytes would."""
    request = pb.PutBlobRequest(namespace=client._ns, data=data,
                                **proto.blob_fields([1, 2, 3], kind))
    client._conns.stub(0).PutBlob(request, timeout=10, metadata=METADATA)


@FUZZ
@given(manifest=forged_manifests(), parts=st.lists(st.binary(min_size=1, max_size=300),
                                                   max_size=4))
def test_parted_blob_with_forged_manifest_is_a_miss_or_its_parts(blob_client: Any,
                                                                   manifest: bytes,
                                                                   parts: list[bytes]) -> None:
    try:
        num_parts = PartManifest.from_bytes(manifest).num_parts
    except Corrupt:
        num_parts = len(parts)
    _put_raw_blob(blob_client, "k", manifest)
    for i, part in enumerate(parts):
        _put_raw_blob(blob_client, part_kind("k", i, num_parts), part)
    got = bounded(lambda: blob_client.get_blob([1, 2, 3], "k"), 2048)
    assert got is None or got == manifest or got == b"".join(parts)


# ------------------------------------------------------------ sparse shadow bundles

def _bundle_bytes(tensors: dict[str, torch.Tensor], meta_text: str) -> bytes:
    from safetensors.torch import save

    payload = save(tensors, metadata={"bundle": meta_text})
    return struct.pack("<4sHHQQ", b"KVSB", 2, 0, len(payload),
                       xxhash.xxh64_intdigest(payload)) + payload


def _meta_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(),
                        st.text(max_size=6))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
        max_leaves=8)


@st.composite
def forged_bundles(draw: Any) -> bytes:
    """Valid-checksum bundles whose metadata and tensor shapes are anything."""
    meta = {"fingerprint": "f" * 32, "num_tokens": 16, "block_tokens": 8, "rope_scaling": 1.0,
            "layers": {"0": 2}}
    for key in draw(st.lists(st.sampled_from(sorted(meta)), max_size=3, unique=True)):
        if draw(st.booleans()):
            meta[key] = draw(_meta_values())
        else:
            del meta[key]
    shape = lambda: tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))  # noqa: E731
    names = ["rope_inv_freq", "tail_k_pre", "tail_v", "0.coeffs", "0.basis", "0.landmarks",
             "0.value_means", "0.outliers"]
    tensors = {n: torch.zeros(shape()) for n in names if draw(st.integers(0, 5))}
    text = json.dumps(meta) if draw(st.integers(0, 5)) else draw(st.text(max_size=20))
    return _bundle_bytes(tensors, text)


@settings(FUZZ, max_examples=30)
@given(forged_bundles())
def test_shadow_bundle_parser_raises_only_corrupt(data: bytes) -> None:
    try:
        bundle = bounded(lambda: ShadowBundle.from_bytes(data), len(data))
    except Corrupt:
        return
    assert bundle.block_tokens >= 1 and bundle.num_blocks >= 0


@pytest.mark.parametrize("meta", [
    {"fingerprint": "f", "num_tokens": 16, "block_tokens": 8, "rope_scaling": 1.0,
     "layers": []},  # a list where a table belongs: AttributeError before the fix
    {"fingerprint": "f", "num_tokens": 16, "block_tokens": 0, "rope_scaling": 1.0,
     "layers": {}},  # block_tokens 0: ZeroDivisionError in num_blocks before the fix
])
def test_forged_bundle_metadata_is_corrupt(meta: dict) -> None:
    tensors = {n: torch.zeros(2, 2, 0, 4) for n in ("tail_k_pre", "tail_v")}
    tensors["rope_inv_freq"] = torch.zeros(2)
    with pytest.raises(Corrupt):
        ShadowBundle.from_bytes(_bundle_bytes(tensors, json.dumps(meta)))


def test_forged_bundle_tensor_of_the_wrong_rank_is_corrupt() -> None:
    meta = {"fingerprint": "f", "num_tokens": 16, "block_tokens": 8, "rope_scaling": 1.0,
            "layers": {"0": 2}}
    tensors = {n: torch.zeros(4) for n in ("rope_inv_freq", "tail_k_pre", "tail_v", "0.coeffs",
                                          "0.basis", "0.landmarks", "0.value_means",
                                          "0.outliers")}
    with pytest.raises(Corrupt):  # IndexError (landmarks.shape[1]) before the fix
        ShadowBundle.from_bytes(_bundle_bytes(tensors, json.dumps(meta)))


def test_valid_inputs_still_decode() -> None:
    """The fuzz seeds are valid: the strategies start from objects that decode."""
    assert decode_raw(RAW)[1].shape == LAYOUT.shape(8)
    assert tuple(codec.decode(KVQ).shape) == LAYOUT.shape(8)
    assert frames.parse_get_response(VALID_FRAME).num_chunks == 7
    assert np.frombuffer(PartManifest(300, 128, 3, 0).to_bytes()[:4], "u1").size == 4
