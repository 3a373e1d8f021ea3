"""One credential check for the whole server: the UI's login form and the API's HTTP Basic.

``--auth``/``--auth-file`` give the pairs once; ``Credentials.check`` is what Gradio's login calls
and what ``require_user`` (the API routes' dependency) calls, so the two cannot disagree.
"""
from __future__ import annotations

import secrets
from typing import Callable, Iterable, Optional

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from engine import RateLimiter, client_key

ANONYMOUS_API_OWNER = "api"


class Credentials:
    """The users allowed in (none: the server is open, as on loopback by default)."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()):
        self._passwords = dict(pairs)

    @property
    def enabled(self) -> bool:
        return bool(self._passwords)

    def check(self, username: str, password: str) -> bool:
        """True when ``username`` exists and ``password`` is its password (constant-time compare)."""
        expected = self._passwords.get(username)
        return expected is not None and secrets.compare_digest(expected.encode(), password.encode())

    def gradio_auth(self) -> Optional[Callable[[str, str], bool]]:
        """What Gradio's ``auth=`` takes: this check, or None when the server is open."""
        return self.check if self.enabled else None


_basic = HTTPBasic(auto_error=False, realm="Stable Diffusion API")


def require_user(credentials: Credentials) -> Callable[..., Optional[str]]:
    """A FastAPI dependency: the authenticated user name, None when auth is off, else 401.
    With auth on it also puts HTTP Basic into the OpenAPI schema (/docs gets an Authorize button)."""

    if not credentials.enabled:
        def open_server() -> None:  # no security scheme in the schema: the server asks for none
            return None

        return open_server

    def dependency(given: Optional[HTTPBasicCredentials] = Depends(_basic)) -> Optional[str]:
        if given is None or not credentials.check(given.username, given.password):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "authentication required: send HTTP Basic credentials "
                                "(a user:password of the server's --auth or --auth-file)",
                                headers={"WWW-Authenticate": 'Basic realm="Stable Diffusion API"'})
        return given.username

    return dependency


def rate_limit(limiter: Optional[RateLimiter], user: Callable[..., Optional[str]]) -> Callable[..., None]:
    """A FastAPI dependency for generation routes: one request from the client's ``--rate-limit``
    budget (the user when auth is on, else the address), or ``RateLimited`` (HTTP 429)."""

    def dependency(request: Request, username: Optional[str] = Depends(user)) -> None:
        if limiter is not None:
            limiter.acquire(client_key(username, request.client.host if request.client else None))

    return dependency


def owner_for(user: Optional[str]) -> str:
    """The engine-queue owner of an API request: the user (shared with their browser sessions),
    or one anonymous API owner when auth is off (A1111's global interrupt, limited to API jobs)."""
    return f"user:{user}" if user else ANONYMOUS_API_OWNER
