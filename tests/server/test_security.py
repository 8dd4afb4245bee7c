"""TLS, mutual TLS, the bind check, bearer tokens and tenant isolation on every RPC."""

from __future__ import annotations

import os
import socket
import stat

import grpc
import numpy as np
import pytest

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.client import Client
from kvstore.codec.raw import encode_raw
from kvstore.errors import InvalidArgument, Unauthenticated, Unavailable
from kvstore.layout import KVLayout
from kvstore.server.app import ServerThread
from tests.certs import issue, make_ca
from tests.conftest import make_config, make_kv, make_tokens

TOKENS = {"tok-a": "alice", "tok-b": "bob"}


def _md(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _ns(layout: KVLayout, name: str = "m") -> pb.Namespace:
    return pb.Namespace(name=name, layout=pb.Layout(
        num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim, dtype=pb.DTYPE_FLOAT16, chunk_tokens=layout.chunk_tokens))


def _put_messages(layout: KVLayout, tokens: np.ndarray, kv: np.ndarray) -> list[pb.PutRequest]:
    step = layout.chunk_tokens
    messages = [pb.PutRequest(header=pb.PutHeader(namespace=_ns(layout),
                                                  tokens_le_i32=tokens.tobytes()))]
    for i in range(len(tokens) // step):
        obj = encode_raw(kv[:, :, :, i * step:(i + 1) * step], layout)
        messages.append(pb.PutRequest(chunk=pb.PutChunk(chunk_index=i, object_part=obj,
                                                        last_part=True)))
    return messages


# ---------------------------------------------------------------- TLS and the bind check

def test_tls_serves_clients_that_trust_the_certificate(tmp_path, layout):
    ca = make_ca(tmp_path)
    server = issue(ca, tmp_path, "server")
    config = make_config(tmp_path / "d", **{"server.tls_cert_file": server.cert_file,
                                            "server.tls_key_file": server.key_file})
    tokens, kv = make_tokens(16), make_kv(layout, 16)
    with ServerThread(config) as srv:
        with Client(srv.address, "m", layout, tls_ca_file=ca.cert_file) as c:
            assert c.put(tokens, kv) == 16
            assert np.array_equal(c.get(tokens, as_numpy=True), kv)
        with Client(srv.address, "m", layout, timeout_s=3) as plain, \
                pytest.raises(Unavailable):
            plain.lookup(tokens)
        other_ca = make_ca(tmp_path / "..", "someone else's CA")
        with Client(srv.address, "m", layout, tls_ca_file=other_ca.cert_file,
                    timeout_s=3) as wrong, pytest.raises(Unavailable):
            wrong.lookup(tokens)


def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(tmp_path, layout):
    ca, client_ca, rogue_ca = (make_ca(tmp_path, n) for n in ("server CA", "client CA",
                                                              "rogue CA"))
    server = issue(ca, tmp_path, "server")
    good = issue(client_ca, tmp_path, "inference-1", client=True)
    rogue = issue(rogue_ca, tmp_path, "intruder", client=True)
    config = make_config(tmp_path / "d", **{
        "server.tls_cert_file": server.cert_file, "server.tls_key_file": server.key_file,
        "server.tls_client_ca_file": client_ca.cert_file})
    tokens, kv = make_tokens(16), make_kv(layout, 16)
    with ServerThread(config) as srv:
        with Client(srv.address, "m", layout, tls_ca_file=ca.cert_file,
                    tls_cert_file=good.cert_file, tls_key_file=good.key_file) as c:
            assert c.put(tokens, kv) == 16
            assert np.array_equal(c.get(tokens, as_numpy=True), kv)
        for cert in (None, rogue):
            kwargs = {} if cert is None else {"tls_cert_file": cert.cert_file,
                                              "tls_key_file": cert.key_file}
            with Client(srv.address, "m", layout, tls_ca_file=ca.cert_file, timeout_s=3,
                        **kwargs) as c, pytest.raises(Unavailable):
                c.lookup(tokens)


def test_async_client_talks_mutual_tls(tmp_path, layout):
    import asyncio

    from kvstore import AsyncClient

    ca, client_ca = make_ca(tmp_path, "server CA"), make_ca(tmp_path, "client CA")
    server, good = issue(ca, tmp_path, "server"), issue(client_ca, tmp_path, "c", client=True)
    config = make_config(tmp_path / "d", **{
        "server.tls_cert_file": server.cert_file, "server.tls_key_file": server.key_file,
        "server.tls_client_ca_file": client_ca.cert_file})
    tokens, kv = make_tokens(16), make_kv(layout, 16)

    async def run(address: str) -> np.ndarray:
        async with AsyncClient(address, "m", layout, tls_ca_file=ca.cert_file,
                               tls_cert_file=good.cert_file, tls_key_file=good.key_file) as c:
            assert await c.put(tokens, kv) == 16
            return await c.get(tokens, as_numpy=True)

    with ServerThread(config) as srv:
        assert np.array_equal(asyncio.run(run(srv.address)), kv)


def test_client_certificate_options_are_checked(tmp_path, layout):
    ca = make_ca(tmp_path)
    cert = issue(ca, tmp_path, "c", client=True)
    with pytest.raises(InvalidArgument, match="both tls_cert_file and tls_key_file"):
        Client("127.0.0.1:1", "m", layout, tls_ca_file=ca.cert_file,
               tls_cert_file=cert.cert_file)
    with pytest.raises(InvalidArgument, match="need TLS"):
        Client("127.0.0.1:1", "m", layout, tls_cert_file=cert.cert_file,
               tls_key_file=cert.key_file)


def test_client_ca_without_server_tls_is_refused(tmp_path):
    ca = make_ca(tmp_path)
    config = make_config(tmp_path / "d", **{"server.tls_client_ca_file": ca.cert_file})
    with pytest.raises(InvalidArgument, match="tls_client_ca_file needs TLS"):
        ServerThread(config).start()


def _non_loopback_addresses() -> list[str]:
    """0.0.0.0 and, where this machine has one, a non-loopback address of its own."""
    found = ["0.0.0.0"]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing interface
            own = s.getsockname()[0]
        if not own.startswith("127.") and own != "0.0.0.0":
            found.append(own)
    except OSError:
        pass
    return found


@pytest.mark.parametrize("host", _non_loopback_addresses())
def test_non_loopback_bind_needs_tls_or_allow_insecure_remote(tmp_path, host):
    listen = {"server.listen": f"{host}:0"}
    with pytest.raises(InvalidArgument, match="allow_insecure_remote"):
        ServerThread(make_config(tmp_path / "d", **listen)).start()
    insecure = make_config(tmp_path / "d", **listen, **{"server.allow_insecure_remote": True})
    with ServerThread(insecure) as srv:
        assert srv.port > 0
    ca = make_ca(tmp_path)
    server = issue(ca, tmp_path, "server")
    tls = make_config(tmp_path / "d", **listen, **{"server.tls_cert_file": server.cert_file,
                                                   "server.tls_key_file": server.key_file})
    with ServerThread(tls) as srv:
        assert srv.port > 0


# ---------------------------------------------------------------- bearer tokens

def _every_rpc(stub: pb_grpc.KVStoreStub, layout: KVLayout, md) -> dict[str, object]:
    """Call every RPC once with metadata ``md``; name -> a thunk."""
    ns, tokens = _ns(layout), make_tokens(32).tobytes()
    return {
        "Lookup": lambda: stub.Lookup(pb.LookupRequest(namespace=ns, tokens_le_i32=tokens),
                                      metadata=md),
        "Put": lambda: stub.Put(iter(_put_messages(layout, make_tokens(32),
                                                   make_kv(layout, 32))), metadata=md),
        "Get": lambda: list(stub.Get(pb.GetRequest(namespace=ns, tokens_le_i32=tokens),
                                     metadata=md)),
        "Delete": lambda: stub.Delete(pb.DeleteRequest(namespace=ns, tokens_le_i32=tokens),
                                      metadata=md),
        "Prefetch": lambda: stub.Prefetch(pb.PrefetchRequest(namespace=ns,
                                                             tokens_le_i32=tokens), metadata=md),
        "Stats": lambda: stub.Stats(pb.StatsRequest(), metadata=md),
        "AttachArena": lambda: stub.AttachArena(pb.AttachArenaRequest(), metadata=md),
        "LeaseChunks": lambda: stub.LeaseChunks(pb.LeaseChunksRequest(
            namespace=ns, tokens_le_i32=tokens), metadata=md),
        "LeaseGpuChunks": lambda: stub.LeaseGpuChunks(pb.LeaseGpuChunksRequest(
            namespace=ns, tokens_le_i32=tokens), metadata=md),
        "ReleaseLease": lambda: stub.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=1),
                                                  metadata=md),
        "ReserveExtents": lambda: stub.ReserveExtents(pb.ReserveExtentsRequest(
            namespace=ns, tokens_le_i32=tokens, object_bytes=[100, 100]), metadata=md),
        "CommitExtents": lambda: stub.CommitExtents(pb.CommitExtentsRequest(
            reservation_id=1), metadata=md),
        "FetchBlocks": lambda: stub.FetchBlocks(pb.FetchBlocksRequest(
            namespace=ns, tokens_le_i32=tokens, heads=[0], blocks=[0]), metadata=md),
        "PutBlob": lambda: stub.PutBlob(pb.PutBlobRequest(namespace=ns, tokens_le_i32=tokens,
                                                          kind="k", data=b"x"), metadata=md),
        "GetBlob": lambda: stub.GetBlob(pb.GetBlobRequest(namespace=ns, tokens_le_i32=tokens,
                                                          kind="k"), metadata=md),
    }


def test_every_rpc_is_unauthenticated_without_a_known_token(tmp_path, layout):
    services = pb.DESCRIPTOR.services_by_name["KVStore"].methods_by_name
    with ServerThread(make_config(tmp_path / "d", **{"server.tokens": TOKENS})) as srv, \
            grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        for md in ((), _md("nope"), (("authorization", "Basic dG9rLWE="),)):
            calls = _every_rpc(stub, layout, md)
            assert set(calls) == set(services)  # a new RPC must be added here
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    with ServerThread(make_config(tmp_path / "d", **{"server.tokens": TOKENS})) as srv, \
            Client(srv.address, "m", layout) as c, pytest.raises(Unauthenticated):
        c.lookup(make_tokens(32))


@pytest.fixture
def two_tenants(tmp_path, layout):
    """A daemon with tenants alice and bob (arena references allowed, to test leases);
    alice has stored 2 chunks and a blob under namespace "m"."""
    config = make_config(tmp_path / "d", **{"server.tokens": TOKENS,
                                            "server.arena_for_tenants": True})
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    with ServerThread(config) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        assert stub.Put(iter(_put_messages(layout, tokens, kv)),
                        metadata=_md("tok-a")).num_chunks_stored == 2
        stub.PutBlob(pb.PutBlobRequest(namespace=_ns(layout), tokens_le_i32=tokens.tobytes(),
                                       kind="bundle", data=b"alice's secret"),
                     metadata=_md("tok-a"))
        yield srv, stub, tokens, kv


def _alice_still_has_everything(address, stub, layout, tokens, kv) -> None:
    ns, md = _ns(layout), _md("tok-a")
    assert stub.Lookup(pb.LookupRequest(namespace=ns, tokens_le_i32=tokens.tobytes()),
                       metadata=md).num_tokens == 32
    blob = stub.GetBlob(pb.GetBlobRequest(namespace=ns, tokens_le_i32=tokens.tobytes(),
                                          kind="bundle"), metadata=md)
    assert blob.data == b"alice's secret"
    with Client(address, "m", layout, token="tok-a",
                transport="stream") as alice:
        assert np.array_equal(alice.get(tokens, as_numpy=True), kv)


def test_tenant_b_cannot_read_list_lease_fetch_or_delete_tenant_a_chunks(two_tenants, layout):
    srv, stub, tokens, kv = two_tenants
    ns, bob, raw = _ns(layout), _md("tok-b"), tokens.tobytes()
    # read and list
    assert stub.Lookup(pb.LookupRequest(namespace=ns, tokens_le_i32=raw),
                       metadata=bob).num_tokens == 0
    assert list(stub.Get(pb.GetRequest(namespace=ns, tokens_le_i32=raw), metadata=bob)) == []
    assert list(stub.Get(pb.GetRequest(namespace=ns, tokens_le_i32=raw, encoded=True),
                         metadata=bob)) == []
    assert stub.GetBlob(pb.GetBlobRequest(namespace=ns, tokens_le_i32=raw, kind="bundle"),
                        metadata=bob).data == b""
    with pytest.raises(grpc.RpcError) as info:
        stub.FetchBlocks(pb.FetchBlocksRequest(namespace=ns, tokens_le_i32=raw, heads=[0],
                                               blocks=[0]), metadata=bob)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    prefetch = stub.Prefetch(pb.PrefetchRequest(namespace=ns, tokens_le_i32=raw), metadata=bob)
    assert (prefetch.num_chunks_promoted, prefetch.num_chunks_resident) == (0, 0)
    # lease: bob maps the arena but gets no extent of alice's chunks
    arena = stub.AttachArena(pb.AttachArenaRequest(), metadata=bob)
    lease = stub.LeaseChunks(pb.LeaseChunksRequest(namespace=ns, tokens_le_i32=raw,
                                                   arena_nonce=arena.nonce), metadata=bob)
    assert (lease.num_chunks_stored, list(lease.extents)) == (0, [])
    # delete, and overwrite attempts under the same names
    assert stub.Delete(pb.DeleteRequest(namespace=ns, tokens_le_i32=raw),
                       metadata=bob).num_chunks_deleted == 0
    assert stub.PutBlob(pb.PutBlobRequest(namespace=ns, tokens_le_i32=raw, kind="bundle",
                                          data=b"bob"), metadata=bob).num_blobs_replaced == 0
    other_kv = make_kv(layout, 32, seed=9)
    assert stub.Put(iter(_put_messages(layout, tokens, other_kv)),
                    metadata=bob).num_chunks_stored == 2  # his own copy, not alice's
    with Client(srv.address, "m", layout, token="tok-b", transport="stream") as b:
        assert np.array_equal(b.get(tokens, as_numpy=True), other_kv)
    _alice_still_has_everything(srv.address, stub, layout, tokens, kv)
    # bob's Stats call is authenticated like any other
    assert stub.Stats(pb.StatsRequest(), metadata=bob).version


def test_tenant_b_cannot_release_tenant_a_lease(two_tenants, layout):
    srv, stub, tokens, _ = two_tenants
    ns, raw = _ns(layout), tokens.tobytes()
    nonce = stub.AttachArena(pb.AttachArenaRequest(), metadata=_md("tok-a")).nonce
    lease = stub.LeaseChunks(pb.LeaseChunksRequest(namespace=ns, tokens_le_i32=raw,
                                                   arena_nonce=nonce), metadata=_md("tok-a"))
    assert len(lease.extents) == 2
    with pytest.raises(grpc.RpcError) as info:
        stub.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=lease.lease_id), metadata=_md("tok-b"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # Still held: its owner's release succeeds (an unknown lease would be NOT_FOUND).
    # Tenants' Stats show no lease counts (daemon-wide figures, issue #17).
    stub.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=lease.lease_id), metadata=_md("tok-a"))


def test_tenant_b_same_host_client_cannot_read_tenant_a_chunks(two_tenants, layout):
    srv, stub, tokens, kv = two_tenants
    with Client(srv.address, "m", layout, token="tok-b", transport="arena") as bob:
        assert bob.lookup(tokens) == 0 and bob.get(tokens) is None
    with Client(srv.address, "m", layout, token="tok-a", transport="arena") as alice:
        assert np.array_equal(alice.get(tokens, as_numpy=True), kv)


# ---------------------------------------------------------------- files on this host

def test_arena_and_disk_files_are_private_to_the_daemon_user(tmp_path, layout):
    config = make_config(tmp_path / "d", **{"engine.write_policy": "write-through"})
    with ServerThread(config) as srv, Client(srv.address, "m", layout) as c:
        c.put(make_tokens(48), make_kv(layout, 48))
        arena = srv.engine.dram.identity().path
        paths = [arena, *map(str, (tmp_path / "d").rglob("*"))]
        assert any(p.endswith(".kvc") for p in paths)
        assert any(p.endswith("namespaces.json") for p in paths)
        for path in paths:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            assert mode & 0o077 == 0, f"{path} has mode {mode:o}: other users can access it"
