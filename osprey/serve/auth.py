"""Optional bearer-token authentication: with a token configured, every API route wants
`Authorization: Bearer <token>`; health (and the static web page, which holds no data) stay
open so that load balancers and browsers can reach them."""

from __future__ import annotations

import hmac
import os
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from osprey.serve.errors import APIError

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="osprey"'}
# Declares the scheme in the OpenAPI schema; the checking is BearerAuth's own.
SCHEME = HTTPBearer(auto_error=False, description="needed when the service has a token")


class BearerAuth:
    """A FastAPI dependency; `token` None or empty lets every request through."""

    def __init__(self, token: str | None) -> None:
        self.token = token or None

    @classmethod
    def from_env(cls, name: str) -> BearerAuth:
        return cls(os.environ.get(name, "").strip() or None)

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def __call__(
        self,
        request: Request,
        _: Annotated[HTTPAuthorizationCredentials | None, Depends(SCHEME)] = None,
    ) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise APIError(401, "authorization", "missing bearer token", "unauthorized", CHALLENGE)
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(
                401, "authorization", "expected 'Bearer <token>'", "unauthorized", CHALLENGE
            )
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise APIError(401, "authorization", "invalid token", "unauthorized", CHALLENGE)
