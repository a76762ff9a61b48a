"""REST access to Baton: a sync helper for socket-less publishers, and the async calls the
WebSocket client needs (create a session, mint tokens, read status).

The request/response shapes live in `_Requests` once; the sync and async classes only differ in
which httpx client sends them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from baton_client.errors import BatonError, PublishError, error_from_wire
from baton_client.util import new_client_ref

API_PREFIX = "/api/v1"
DEFAULT_CAPABILITIES = ("subscribe", "publish", "presence")


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] | None = None


def _raise_for(response: httpx.Response) -> Any:
    """Return the decoded JSON body, or raise the SDK error the server's error body names.

    Refused writes (POST) raise `PublishError` subclasses, refused reads plain `BatonError`.
    """
    if response.is_success:
        return response.json() if response.content else None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        fallback = PublishError if response.request.method == "POST" else BatonError
        raise error_from_wire(body["error"], status=response.status_code, fallback=fallback)
    raise BatonError(
        f"HTTP {response.status_code} from {response.request.method} {response.request.url}",
        status=response.status_code,
    )


def _event_body(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if v is not None}


class _Requests:
    """Builds the request for each REST call; no I/O here."""

    @staticmethod
    def create_session(title: str | None, metadata: dict[str, Any] | None) -> _Request:
        body: dict[str, Any] = {}
        if title is not None:
            body["title"] = title
        if metadata is not None:
            body["metadata"] = metadata
        return _Request("POST", "/sessions", json=body)

    @staticmethod
    def get_session(session_id: str) -> _Request:
        return _Request("GET", f"/sessions/{session_id}")

    @staticmethod
    def list_sessions(status: str | None) -> _Request:
        return _Request("GET", "/sessions", params={"status": status} if status else None)

    @staticmethod
    def publish(
        session_id: str, events: Sequence[dict[str, Any]], idempotency_key: str | None
    ) -> _Request:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        body = {"events": [_event_body(e) for e in events]}
        return _Request("POST", f"/sessions/{session_id}/events", json=body, headers=headers)

    @staticmethod
    def history(
        session_id: str, after: int | None, limit: int | None, types: Iterable[str] | None
    ) -> _Request:
        params: dict[str, Any] = {}
        if after is not None:
            params["after"] = after
        if limit is not None:
            params["limit"] = limit
        if types:
            params["types"] = ",".join(types)
        return _Request("GET", f"/sessions/{session_id}/events", params=params)

    @staticmethod
    def messages(session_id: str) -> _Request:
        return _Request("GET", f"/sessions/{session_id}/messages")

    @staticmethod
    def presence(session_id: str) -> _Request:
        return _Request("GET", f"/sessions/{session_id}/presence")

    @staticmethod
    def presence_lease(
        session_id: str, ttl: float, client_id: str | None, state: dict[str, Any] | None
    ) -> _Request:
        body: dict[str, Any] = {"ttl": ttl}
        if client_id is not None:
            body["client_id"] = client_id
        if state is not None:
            body["state"] = state
        return _Request("POST", f"/sessions/{session_id}/presence", json=body)

    @staticmethod
    def mint_token(
        session_id: str,
        client_id: str,
        kind: str,
        capabilities: Sequence[str],
        ttl: int,
        name: str | None,
    ) -> _Request:
        body: dict[str, Any] = {
            "client_id": client_id,
            "kind": kind,
            "capabilities": list(capabilities),
            "ttl": ttl,
        }
        if name is not None:
            body["name"] = name
        return _Request("POST", f"/sessions/{session_id}/tokens", json=body)


def _headers(api_key: str, client_id: str | None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
    if client_id:
        headers["X-Baton-Client-Id"] = client_id
    return headers


class BatonREST:
    """Synchronous REST client for publishers that hold no socket (cron jobs, webhooks, workers).

    Every publish carries a `client_ref` (generated when the caller gives none) so a retried POST
    never stores an event twice; `idempotency_key` covers the whole batch instead.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        client_id: str | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url + API_PREFIX,
            headers=_headers(api_key, client_id),
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BatonREST:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, req: _Request) -> Any:
        response = self._http.request(
            req.method, req.path, json=req.json, params=req.params, headers=req.headers
        )
        return _raise_for(response)

    def create_session(
        self, title: str | None = None, metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Create a session; returns its JSON (`id`, `status`, `last_seq`, …)."""
        return self._call(_Requests.create_session(title, metadata))

    def get_session(self, session_id: str) -> dict[str, Any]:
        return self._call(_Requests.get_session(session_id))

    def list_sessions(self, status: str | None = None) -> list[dict[str, Any]]:
        """Newest first (agent keys and operators only)."""
        return list(self._call(_Requests.list_sessions(status))["sessions"])

    def publish(
        self,
        session_id: str,
        events: dict[str, Any] | Sequence[dict[str, Any]],
        *,
        idempotency_key: str | None = None,
    ) -> list[dict[str, Any]]:
        """Publish one event or an atomic batch; returns `[{seq, id, message_id, duplicate}]`.

        Without an `idempotency_key`, events lacking a `client_ref` get a fresh one, so callers
        who retry should pass their own key (or refs) to make the retry a no-op.
        """
        batch = [events] if isinstance(events, dict) else list(events)
        if idempotency_key is None:
            batch = [
                e if e.get("client_ref") else {**e, "client_ref": new_client_ref()} for e in batch
            ]
        body = self._call(_Requests.publish(session_id, batch, idempotency_key))
        return list(body["events"])

    def history(
        self,
        session_id: str,
        after: int | None = None,
        limit: int | None = None,
        types: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """One page: `{"events": […], "next_after": N, "head": H}`."""
        return self._call(_Requests.history(session_id, after, limit, types))

    def iter_history(
        self, session_id: str, after: int | None = None, types: Iterable[str] | None = None
    ) -> Iterable[dict[str, Any]]:
        """Every stored event after `after`, page by page, until the head seen at the end."""
        position = after or 0
        types = list(types) if types else None
        while True:
            page = self.history(session_id, after=position, limit=1000, types=types)
            yield from page["events"]
            next_after = page.get("next_after") or position
            if not page["events"] or next_after >= page.get("head", next_after):
                return
            position = next_after

    def messages(self, session_id: str) -> dict[str, Any]:
        """The materialized snapshot `{"seq": S, "messages": […]}`."""
        return self._call(_Requests.messages(session_id))

    def presence(self, session_id: str) -> list[dict[str, Any]]:
        return list(self._call(_Requests.presence(session_id))["members"])

    def presence_lease(
        self,
        session_id: str,
        ttl: float,
        *,
        client_id: str | None = None,
        state: dict[str, Any] | None = None,
    ) -> Any:
        """Count as present for `ttl` seconds without a socket; renew before it runs out.

        `ttl=0` leaves at once; letting it expire yields `presence.leave` reason `timeout`.
        """
        return self._call(_Requests.presence_lease(session_id, ttl, client_id, state))

    def mint_token(
        self,
        session_id: str,
        client_id: str,
        *,
        kind: str = "user",
        capabilities: Sequence[str] = DEFAULT_CAPABILITIES,
        ttl: int = 3600,
        name: str | None = None,
    ) -> dict[str, Any]:
        """A session-scoped client token for a browser: `{"token": "ct_…", "expires_at": …}`."""
        return self._call(
            _Requests.mint_token(session_id, client_id, kind, capabilities, ttl, name)
        )


class AsyncREST:
    """The same calls over `httpx.AsyncClient`, used by `BatonClient`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        client_id: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url + API_PREFIX,
            headers=_headers(api_key, client_id),
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, req: _Request) -> Any:
        response = await self._http.request(
            req.method, req.path, json=req.json, params=req.params, headers=req.headers
        )
        return _raise_for(response)

    async def create_session(
        self, title: str | None = None, metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return await self._call(_Requests.create_session(title, metadata))

    async def get_session(self, session_id: str) -> dict[str, Any]:
        return await self._call(_Requests.get_session(session_id))

    async def list_sessions(self, status: str | None = None) -> list[dict[str, Any]]:
        return list((await self._call(_Requests.list_sessions(status)))["sessions"])

    async def publish(
        self,
        session_id: str,
        events: Sequence[dict[str, Any]],
        *,
        idempotency_key: str | None = None,
    ) -> list[dict[str, Any]]:
        body = await self._call(_Requests.publish(session_id, events, idempotency_key))
        return list(body["events"])

    async def history(
        self,
        session_id: str,
        after: int | None = None,
        limit: int | None = None,
        types: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        return await self._call(_Requests.history(session_id, after, limit, types))

    async def messages(self, session_id: str) -> dict[str, Any]:
        return await self._call(_Requests.messages(session_id))

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
        return await self._call(
            _Requests.mint_token(session_id, client_id, kind, capabilities, ttl, name)
        )
