"""`make run`: Baton on the embedded default, plus the demo agent when it is installed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from project.server import uvicorn_command
from sessions_app.models import AgentKey
from sessions_app.services import create_agent_key

DEMO_STATE = Path(settings.BASE_DIR) / ".baton-demo.json"
DEMO_AGENT = "demo-agent"
DEMO_OPERATOR = ("operator", "operator")


class Command(BaseCommand):
    help = "Start Baton with its demo (agent, chat page, operator) on http://HOST:PORT."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--no-agent", action="store_true", help="Do not start the demo agent.")

    def handle(self, *args: Any, **options: Any) -> None:
        key = self._demo_key()
        call_command(
            "create_operator",
            DEMO_OPERATOR[0],
            password=DEMO_OPERATOR[1],
            name="Demo Operator",
            staff=True,
            stdout=open(os.devnull, "w"),  # noqa: SIM115
        )
        base = f"http://{options['host']}:{options['port']}"
        server = subprocess.Popen(
            uvicorn_command(host=options["host"], port=options["port"], ping_seconds=10),
            cwd=settings.BASE_DIR,
        )
        children = [server]
        agent_module = Path(settings.BASE_DIR) / "baton_client" / "demo_agent.py"
        if not options["no_agent"] and agent_module.exists():
            time.sleep(1.5)
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "baton_client.demo_agent", "--url", base, "--key", key],
                    cwd=settings.BASE_DIR,
                )
            )
        self.stdout.write(
            f"\nBaton is running on {base}\n"
            f"  demo chat:        {base}/demo/\n"
            f"  operator console: {base}/console/  (user {DEMO_OPERATOR[0]!r}, "
            f"password {DEMO_OPERATOR[1]!r})\n"
            f"  API docs:         {base}/api/docs/\n"
            f"  demo agent key:   {key}\n"
            "Press Ctrl+C to stop.\n"
        )
        try:
            while all(child.poll() is None for child in children):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)
            for child in children:
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()

    def _demo_key(self) -> str:
        """The demo agent's key survives restarts in a local file (keys are stored hashed)."""
        if DEMO_STATE.exists():
            state = json.loads(DEMO_STATE.read_text())
            if AgentKey.objects.filter(name=DEMO_AGENT, revoked_at__isnull=True).exists():
                return str(state["key"])
        AgentKey.objects.filter(name=DEMO_AGENT).delete()
        _key, raw = create_agent_key(name=DEMO_AGENT)
        DEMO_STATE.write_text(json.dumps({"key": raw}))
        DEMO_STATE.chmod(0o600)
        return raw
