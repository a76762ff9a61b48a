"""A demo agent built on the SDK: `python -m baton_client.demo_agent --url URL --key bk_…`.

It has no model behind it. It watches for sessions, and in each one answers user messages by
streaming a canned reply token by token with tool progress in between, so every Baton feature
is visible from the demo chat and the console: resume, cancel ("stop"), redirect, presence,
and handover (say "human" or "operator" and it asks for one, then stays quiet while an
operator holds the session).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
from collections.abc import AsyncIterator

import httpx

from baton_client import (
    BatonClient,
    BatonError,
    ConnectionRejected,
    ControlledByHuman,
    Session,
    SessionClosed,
)

log = logging.getLogger("baton_client.demo_agent")

HANDOVER_WORDS = ("human", "operator", "person", "agent please")
FILLER = (
    "Baton keeps this conversation durable: if your connection drops, or you reload the page, "
    "the reply continues exactly where it was, with no gap and no repeated words. Press stop "
    "to cancel me, or send a new instruction to redirect me while I am typing."
)


def reply_for(text: str) -> str:
    return f'You said: "{text.strip()[:200]}". {FILLER}'


class OpenAICompatibleLLM:
    """Streams a chat completion from any OpenAI-compatible endpoint (`BATON_DEMO_LLM_URL`)."""

    def __init__(
        self,
        url: str,
        api_key: str = "",
        model: str = "gpt-4o-mini",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.transport = transport

    @classmethod
    def from_env(cls) -> OpenAICompatibleLLM | None:
        url = os.environ.get("BATON_DEMO_LLM_URL")
        if not url:
            return None
        return cls(
            url,
            os.environ.get("BATON_DEMO_LLM_KEY", ""),
            os.environ.get("BATON_DEMO_LLM_MODEL", "gpt-4o-mini"),
        )

    async def stream(self, text: str) -> AsyncIterator[str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {
            "model": self.model,
            "stream": True,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant in the Baton demo."},
                {"role": "user", "content": text},
            ],
        }
        async with (
            httpx.AsyncClient(timeout=60, transport=self.transport) as http,
            http.stream(
                "POST", f"{self.url}/chat/completions", json=body, headers=headers
            ) as response,
        ):
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    return
                choices = json.loads(payload).get("choices") or [{}]
                delta = (choices[0].get("delta") or {}).get("content")
                if delta:
                    yield delta


class SessionWorker:
    """Serves one session until it is closed."""

    def __init__(
        self,
        client: BatonClient,
        session_id: str,
        token_delay: float,
        llm: OpenAICompatibleLLM | None = None,
    ) -> None:
        self.client = client
        self.llm = llm
        self.session_id = session_id
        self.token_delay = token_delay
        self.session: Session | None = None
        self.reply: asyncio.Task[None] | None = None
        self._start_seq = 0

    async def run(self) -> None:
        session = await self.client.connect(self.session_id)
        self.session = session
        self._start_seq = session.last_seq  # everything up to here is history, not a request
        try:
            pending = await self._unanswered_from_history()
            watching = asyncio.create_task(self._watch_signals(session))
            try:
                if pending is not None:
                    self._start_reply(pending)
                await self._serve(session)
            finally:
                watching.cancel()
                if self.reply is not None:
                    self.reply.cancel()
        finally:
            await session.close()

    async def _unanswered_from_history(self) -> str | None:
        """After a restart, answer the last user message if nothing answered it yet."""
        snapshot = await self.client.rest.messages(self.session_id)
        history = [m for m in snapshot["messages"] if m["created_seq"] <= self._start_seq]
        history.sort(key=lambda m: m["created_seq"])
        if history and history[-1]["role"] == "user":
            return str(history[-1]["content"] or "")
        return None

    async def _serve(self, session: Session) -> None:
        async for event in session.events():
            if event["type"] == "session.closed":
                return
            if (
                event["type"] == "message.create"
                and event["data"].get("role") == "user"
                and event["seq"] > self._start_seq
            ):
                self._start_reply(event["data"].get("content") or "")

    async def tokens(self, text: str) -> AsyncIterator[str]:
        """The scripted reply at a realistic pace, or a real model's stream when configured."""
        if self.llm is not None:
            async for token in self.llm.stream(text):
                yield token
            return
        for word in reply_for(text).split(" "):
            yield word + " "
            await asyncio.sleep(self.token_delay * random.uniform(0.5, 1.5))

    def _start_reply(self, text: str) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.cancel()  # a new user message supersedes the answer in progress
        self.reply = asyncio.create_task(self._answer(text))

    async def _watch_signals(self, session: Session) -> None:
        async for signal in session.signals():
            if signal["type"] == "signal.redirect":
                text = (signal.get("data") or {}).get("text") or ""
                self._start_reply(f"(redirected) {text}")

    async def _answer(self, text: str) -> None:
        session = self.session
        assert session is not None
        try:
            if session.controlled_by_human:
                await session.wait_until_released()
                return  # the operator answered; do not talk over them
            if any(word in text.lower() for word in HANDOVER_WORDS):
                await session.request_handover(
                    reason="The user asked for a person.", summary=f"Last message: {text[:200]}"
                )
                await session.send_message("Sure, I am asking a human operator to join.")
                return
            await session.progress("thinking", {"step": "reading your message"})
            await asyncio.sleep(0.3)
            await session.progress("tool_call", {"name": "search_docs", "args": {"q": text[:80]}})
            await asyncio.sleep(0.3)
            await session.progress("tool_result", {"name": "search_docs", "hits": 3})
            async with session.stream_message(role="assistant") as msg:
                async for token in self.tokens(text):
                    if not session.users:
                        # Nobody is watching: stop burning tokens until a user is back.
                        await session.progress("paused", {"reason": "no user present"})
                        await session.wait_for_user()
                        await session.progress("resumed", {})
                    await msg.append(token)
        except (ControlledByHuman, SessionClosed) as exc:
            log.info("demo agent: %s in %s", exc.code, self.session_id)


async def discover(
    client: BatonClient, token_delay: float, poll: float, llm: OpenAICompatibleLLM | None = None
) -> None:
    """Serve every session that is not closed; pick up new ones as they appear."""
    workers: dict[str, asyncio.Task[None]] = {}
    while True:
        try:
            sessions = await client.list_sessions()
        except (BatonError, OSError) as exc:
            log.warning("demo agent: cannot list sessions (%s)", exc)
            sessions = []
        for info in sessions:
            sid = info["id"]
            if info.get("status") == "closed" or (sid in workers and not workers[sid].done()):
                continue
            workers[sid] = asyncio.create_task(_run_worker(client, sid, token_delay, llm))
        await asyncio.sleep(poll)


async def _run_worker(
    client: BatonClient, session_id: str, token_delay: float, llm: OpenAICompatibleLLM | None
) -> None:
    worker = SessionWorker(client, session_id, token_delay, llm)
    try:
        await worker.run()
    except ConnectionRejected as exc:
        log.warning("demo agent: %s refused us: %s", session_id, exc)
    except Exception:
        log.exception("demo agent: worker for %s failed", session_id)


async def main_async(url: str, key: str, token_delay: float, poll: float) -> None:
    llm = OpenAICompatibleLLM.from_env()
    if llm is not None:
        log.info("demo agent: streaming from %s (%s)", llm.url, llm.model)
    async with BatonClient(url, key, client_id="demo-agent") as client:
        await discover(client, token_delay, poll, llm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True, help="agent key (bk_…)")
    parser.add_argument("--token-delay", type=float, default=0.03, help="seconds per word")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between session scans")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll is noise
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args.url, args.key, args.token_delay, args.poll))


if __name__ == "__main__":
    main()
