"""`purge_sessions --closed-before 2026-01-01` (or `30d`): delete old closed sessions."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sessions_app.retention import parse_cutoff, purge_sessions


class Command(BaseCommand):
    help = "Delete closed sessions (and their events, messages, connections) untouched since."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--closed-before", required=True, help="an ISO date or a duration ago (30d, 12h)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            cutoff = parse_cutoff(options["closed_before"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        ids = purge_sessions(closed_before=cutoff)
        self.stdout.write(f"purged {len(ids)} closed sessions")
