"""Optional bearer-token authentication: a token names the tenant a request acts for.

With ``server.tokens`` empty every caller is tenant ``None``. With tokens
configured, a call must carry ``authorization: Bearer <token>`` metadata; the
token's tenant goes into the request's Namespace, so the keys of two tenants
never collide even when their namespace names do.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Iterable, Mapping

from kvstore.errors import InvalidArgument, NotFound, Unauthenticated

AUTH_METADATA_KEY = "authorization"  # gRPC metadata keys are lower case
_SCHEME = "bearer "


class Authenticator:
    """Maps the ``authorization`` metadata of a call to its tenant."""

    __slots__ = ("_tokens",)

    def __init__(self, tokens: Mapping[str, str]) -> None:
        for token, tenant in tokens.items():
            if not token or not isinstance(tenant, str) or not tenant:
                raise InvalidArgument(
                    "server.tokens must map non-empty tokens to non-empty tenant names, "
                    f"got a token of {len(token)} chars -> {tenant!r}"
                )
        self._tokens = {t.encode(): tenant for t, tenant in tokens.items()}

    @property
    def is_enabled(self) -> bool:
        return bool(self._tokens)

    def tenant_for(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """The tenant of a call, or None when auth is off.

        Raises:
            Unauthenticated: auth is on and the call has no known bearer token.
        """
        if not self._tokens:
            return None
        header = None
        for key, value in metadata or ():
            if key.lower() == AUTH_METADATA_KEY:
                header = value.decode() if isinstance(value, bytes) else value
                break
        if header is None:
            raise Unauthenticated(
                "this daemon requires 'authorization: Bearer <token>' metadata; none was sent"
            )
        if not header.lower().startswith(_SCHEME):
            raise Unauthenticated(
                f"authorization metadata must be 'Bearer <token>', got scheme "
                f"{header.split(' ', 1)[0]!r}"
            )
        presented = header[len(_SCHEME):].strip().encode()
        # Compare against every token in constant time so timing does not leak a prefix.
        tenant = None
        for token, owner in self._tokens.items():
            if hmac.compare_digest(token, presented):
                tenant = owner
        if tenant is None:
            raise Unauthenticated("unknown bearer token (see server.tokens)")
        return tenant


class LeaseOwners:
    """Which tenant took each arena lease, so only that tenant can release it.

    Lease ids are random 63-bit numbers, so guessing one is already hopeless; this
    makes a leaked id useless to another tenant too. Entries are dropped on release
    and once their lease has expired (it is gone from the arena by then).
    """

    __slots__ = ("_lock", "_owners")

    def __init__(self) -> None:
        self._owners: dict[int, tuple[str | None, float]] = {}  # id -> (tenant, expiry)
        self._lock = threading.Lock()

    def record(self, lease_id: int, tenant: str | None, ttl_s: float) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._owners) >= 1024:  # prune expired leases now and then
                self._owners = {i: e for i, e in self._owners.items() if e[1] > now}
            self._owners[lease_id] = (tenant, now + ttl_s)

    def check_release(self, lease_id: int, tenant: str | None) -> None:
        """Forget ``lease_id`` if ``tenant`` took it.

        Raises:
            NotFound: another tenant took it (said the same way as an unknown id, so
                the answer reveals nothing about other tenants' leases).
        """
        with self._lock:
            entry = self._owners.get(lease_id)
            if entry is not None and entry[0] != tenant:
                raise NotFound(f"lease {lease_id} is not held (released or expired)")
            self._owners.pop(lease_id, None)
