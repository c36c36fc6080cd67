"""Optional bearer-token authentication: with a token configured, every API route wants
`Authorization: Bearer <token>`; health (and the static web page, which holds no data) stay
open so that load balancers and browsers can reach them."""

from __future__ import annotations

import hmac
import os
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from osprey.serve.errors import APIError

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="osprey"'}
# Declares the scheme in the OpenAPI schema and parses the header; BearerAuth checks the token.
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
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(SCHEME)] = None,
    ) -> None:
        if self.token is None:
            return
        # HTTPBearer parsed the header: None when it is missing or not "Bearer <token>".
        if credentials is None:
            raise APIError(
                401, "authorization", "missing bearer token: send 'Authorization: Bearer "
                "<token>'", "unauthorized", CHALLENGE,
            )  # fmt: skip
        if not hmac.compare_digest(credentials.credentials.encode(), self.token.encode()):
            raise APIError(401, "authorization", "invalid token", "unauthorized", CHALLENGE)
