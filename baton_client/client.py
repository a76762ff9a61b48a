"""`BatonClient`: the entry point of the agent SDK (REST calls + `connect()` to a session)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from baton_client.rest import DEFAULT_CAPABILITIES, AsyncREST
from baton_client.session import Session


class BatonClient:
    """Talks to one Baton server with one credential.

    `api_key` is an agent key (`bk_…`, any session) or a client token (`ct_…`, one session).
    With an agent key the SDK knows it speaks as an agent and refuses message publishes locally
    while an operator holds the session; pass `kind=` to override that guess.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        client_id: str | None = None,
        kind: str | None = None,
        coalesce_window: float = 0.025,
        timeout: float = 10.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must be http(s)://host[:port]")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.client_id = client_id
        self.kind = kind if kind is not None else ("agent" if api_key.startswith("bk_") else None)
        self.coalesce_window = coalesce_window
        self.rest = AsyncREST(self.base_url, api_key, client_id=client_id, timeout=timeout)

    async def aclose(self) -> None:
        await self.rest.aclose()

    async def __aenter__(self) -> BatonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def create_session(
        self, title: str | None = None, metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Create a session (agent keys only); returns its JSON with `id`."""
        return await self.rest.create_session(title, metadata)

    async def get_session(self, session_id: str) -> dict[str, Any]:
        return await self.rest.get_session(session_id)

    async def list_sessions(self, status: str | None = None) -> list[dict[str, Any]]:
        """Sessions, newest first, optionally by status (agent keys only)."""
        return await self.rest.list_sessions(status)

    async def mint_token(
        self,
        session_id: str,
        client_id: str,
        *,
        kind: str = "user",
        capabilities: Sequence[str] = DEFAULT_CAPABILITIES,
        ttl: int = 3600,
        name: str | None = None,
    ) -> dict[str, Any]:
        """A signed, session-scoped client token for a browser or device: `{"token", …}`."""
        return await self.rest.mint_token(
            session_id, client_id, kind=kind, capabilities=capabilities, ttl=ttl, name=name
        )

    async def connect(
        self,
        session_id: str,
        after: int | None = None,
        types: Sequence[str] | None = None,
        client_id: str | None = None,
        *,
        timeout: float | None = 30.0,
        **options: Any,
    ) -> Session:
        """Attach to a session and return once caught up (the `attached` frame arrived).

        `after`: resume after this seq (None = from the first event). `types`: globs of the
        event types `events()` yields (the SDK still reads presence, handover and signals for
        its own state). `options` go to `Session` (`backoff_base`, `backoff_max`,
        `ping_interval`, `backlog_limit`, `coalesce_window`).
        """
        options.setdefault("coalesce_window", self.coalesce_window)
        session = Session(
            self,
            session_id,
            after=after,
            types=types,
            client_id=client_id or self.client_id,
            kind=self.kind,
            **options,
        )
        return await session.start(timeout=timeout)
