"""Fixtures of the handover tests: operators, their browser-like clients and cookie sockets."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.test import Client
from rest_framework.test import APIClient

from sessions_app.identity import Author

AGENT = Author(kind="agent", id="test-agent", name="test-agent")
USER = Author(kind="user", id="user-1", name="User-1")
OLIVIA = Author(kind="operator", id="olivia", name="Olivia")


def make_operator(username: str, password: str = "pw") -> Any:
    from django.contrib.auth.models import Permission, User

    user = User.objects.create_user(username, password=password, first_name=username.title())
    user.user_permissions.add(
        Permission.objects.get(codename="operate", content_type__app_label="handover")
    )
    return User.objects.get(pk=user.pk)


@pytest.fixture
def plain_user(db: None) -> Any:
    from django.contrib.auth.models import User

    return User.objects.create_user("mallory", password="pw-mallory")


@pytest.fixture
def operator_api(operator_user: Any) -> APIClient:
    client = APIClient()
    client.force_login(operator_user)
    return client


@pytest.fixture
def operator_client(operator_user: Any) -> Client:
    client = Client()
    client.force_login(operator_user)
    return client


def cookie_headers(client: Client, origin: str = "http://testserver") -> list[tuple[bytes, bytes]]:
    """Headers a browser would send on a same-origin WebSocket with the client's session."""
    cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
    return [
        (b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()),
        (b"origin", origin.encode()),
        (b"host", b"testserver"),
    ]
