"""`compact_sessions --older-than 30d`: fold old token streams into their messages."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sessions_app.retention import compact_sessions, parse_cutoff


class Command(BaseCommand):
    help = (
        "Fold the message.append/update events of completed messages whose events are all "
        "older than the cutoff into their message.create event; resumes stay exact."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than", required=True, help="a duration (30d, 12h, 90m) or an ISO date"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            cutoff = parse_cutoff(options["older_than"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        results = compact_sessions(cutoff=cutoff)
        for r in results:
            self.stdout.write(
                f"{r.session_id}: through seq {r.through}, {r.messages} messages, "
                f"{r.events_deleted} events folded"
            )
        deleted = sum(r.events_deleted for r in results)
        self.stdout.write(f"compacted {len(results)} sessions, {deleted} events folded")
