"""`/ws/console/`: pushes the queue and the live sessions to operators.

Fed two ways so it works with one process (in-memory layer) and many (Redis): handover services
poke the channel-layer group `baton.console` after commit, and each socket re-reads the state
every `BATON_CONSOLE_REFRESH_SECONDS` (default 2; a request published as a plain event by an
SDK, or a poke lost by the layer, shows up within that). A frame is sent only when it changed.
"""

import asyncio
import contextlib
import json
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from handover import selectors
from handover.services import CONSOLE_GROUP
from sessions_app.auth import AuthError, check_origin, principal_from_user, scope_user

log = logging.getLogger(__name__)

DEBOUNCE_SECONDS = 0.05


def _authorize(scope: dict[str, Any]) -> None:
    user = scope_user(scope)
    if not getattr(user, "is_authenticated", False):
        raise AuthError("Log in to the console first.")
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    check_origin(headers)
    if principal_from_user(user) is None:
        raise AuthError("This account is not an operator.", forbidden=True)


class ConsoleConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        self.last_sent: str | None = None
        self.poke = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.joined = False
        await self.accept()
        try:
            await database_sync_to_async(_authorize)(self.scope)
        except AuthError as exc:
            await self.send(text_data=json.dumps({"op": "error", **exc.as_dict()}))
            await self.close(code=exc.close_code)
            return
        if self.channel_layer is not None:
            try:
                await self.channel_layer.group_add(CONSOLE_GROUP, self.channel_name)
                self.joined = True
            except Exception:
                log.warning("console could not join %s; polling only", CONSOLE_GROUP)
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        while True:
            self.poke.clear()
            try:
                state = await database_sync_to_async(selectors.console_state)()
                text = json.dumps({"op": "state", **state}, separators=(",", ":"))
                if text != self.last_sent:
                    self.last_sent = text
                    await self.send(text_data=text)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("console refresh failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.poke.wait(), settings.BATON_CONSOLE_REFRESH_SECONDS)
            await asyncio.sleep(DEBOUNCE_SECONDS)  # let a burst of pokes coalesce

    async def console_changed(self, message: dict[str, Any]) -> None:
        self.poke.set()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data and '"ping"' in text_data:
            await self.send(text_data='{"op":"pong"}')

    async def disconnect(self, code: int) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self.joined:
            with contextlib.suppress(Exception):
                await self.channel_layer.group_discard(CONSOLE_GROUP, self.channel_name)
