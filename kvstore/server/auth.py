"""Optional bearer-token authentication: a token names the tenant a request acts for.

With ``server.tokens`` empty every caller is tenant ``None``. With tokens
configured, a call must carry ``authorization: Bearer <token>`` metadata; the
token's tenant goes into the request's Namespace, so the keys of two tenants
never collide even when their namespace names do.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from kvstore.errors import InvalidArgument, Unauthenticated

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
