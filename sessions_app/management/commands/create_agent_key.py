from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sessions_app.errors import BatonError
from sessions_app.services import create_agent_key


class Command(BaseCommand):
    help = "Create an agent API key. The key is printed once, as the last line of output."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="A unique name; it becomes the agent's author id.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            key, raw = create_agent_key(name=options["name"])
        except BatonError as exc:
            raise CommandError(exc.message) from None
        self.stderr.write(f"Created agent key {key.name!r} ({key.prefix}…). Store it now:")
        self.stdout.write(raw)
