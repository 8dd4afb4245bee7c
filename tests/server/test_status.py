"""The error -> status table, its inverse in the client, and the namespace registry."""

from __future__ import annotations

import json
import logging

import grpc
import pytest

from kvstore import errors
from kvstore.client._status import ERROR_BY_STATUS, error_from_rpc
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.server.auth import Authenticator
from kvstore.server.namespaces import REGISTRY_FILE, NamespaceRegistry
from kvstore.server.status import STATUS_BY_ERROR, describe, status_for


@pytest.mark.parametrize("cls, code", [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.CapacityExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Corrupt, grpc.StatusCode.DATA_LOSS),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
])
def test_status_for_maps_each_error_class(cls, code):
    assert status_for(cls("x")) == code


def test_status_for_unexpected_error_is_internal_and_logged(caplog):
    with caplog.at_level(logging.ERROR):
        code, details = describe(ZeroDivisionError("secret path /x"))
    assert code == grpc.StatusCode.INTERNAL
    assert "ZeroDivisionError" in details and "secret" not in details
    assert caplog.records[0].exc_info is not None


def test_client_table_inverts_server_table():
    for cls, code in STATUS_BY_ERROR:
        assert ERROR_BY_STATUS[code] is cls


class _FakeRpcError(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAUTHENTICATED

    def details(self):
        return "no token"


def test_error_from_rpc_names_code_and_address():
    err = error_from_rpc(_FakeRpcError(), "127.0.0.1:1")
    assert isinstance(err, errors.PermissionDenied)
    assert "UNAUTHENTICATED" in str(err) and "127.0.0.1:1" in str(err)


def test_authenticator_maps_token_to_tenant_when_enabled():
    auth = Authenticator({"tok": "alice"})
    assert auth.tenant_for([("authorization", "Bearer tok")]) == "alice"
    for metadata in ([], [("authorization", "Bearer other")], [("authorization", "Basic x")]):
        with pytest.raises(errors.PermissionDenied):
            auth.tenant_for(metadata)
    assert Authenticator({}).tenant_for([]) is None


def test_registry_fixes_layout_on_first_register_and_persists(tmp_path):
    layout = KVLayout(4, 3, 64)
    registry = NamespaceRegistry(tmp_path)
    ns = Namespace("m", layout)
    assert registry.check(ns) is False
    assert registry.register(ns) is True and registry.register(ns) is False
    clash = Namespace("m", KVLayout(4, 3, 128))
    with pytest.raises(errors.InvalidArgument) as info:
        registry.check(clash)
    assert "head_dim=64" in str(info.value) and "head_dim=128" in str(info.value)
    assert registry.check(Namespace("m", KVLayout(4, 3, 128), tenant="bob")) is False
    reloaded = NamespaceRegistry(tmp_path)
    assert reloaded.layout_of(ns) == layout
    assert json.loads((tmp_path / REGISTRY_FILE).read_text())["version"] == 1


def test_registry_ignores_a_damaged_file(tmp_path):
    (tmp_path / REGISTRY_FILE).write_text("{not json")
    assert len(NamespaceRegistry(tmp_path)) == 0
    assert NamespaceRegistry(None).path is None
