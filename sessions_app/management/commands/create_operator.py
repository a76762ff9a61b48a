from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management.base import BaseCommand, CommandError, CommandParser


class Command(BaseCommand):
    help = "Create (or update) a Django user with the handover.operate permission."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--password", help="Set this password (else the account has none).")
        parser.add_argument("--name", default="", help="Display name shown to users.")
        parser.add_argument("--staff", action="store_true", help="Also allow Django admin.")

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        username = options["username"].strip()
        if not username:
            raise CommandError("A username is required.")
        user, created = User.objects.get_or_create(username=username)
        if options["password"]:
            user.set_password(options["password"])
        elif created:
            user.set_unusable_password()
        if options["name"]:
            user.first_name = options["name"]
        if options["staff"]:
            user.is_staff = True
        user.save()
        perm = Permission.objects.get(codename="operate", content_type__app_label="handover")
        user.user_permissions.add(perm)
        self.stdout.write(f"{'Created' if created else 'Updated'} operator {username!r}.")
