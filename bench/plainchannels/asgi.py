"""ASGI entry point of contender (c), served by the same uvicorn as Baton."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.plainchannels.settings")
django_asgi = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from bench.plainchannels.consumers import SessionConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi,
        "websocket": URLRouter([path("ws/sessions/<str:session_id>/", SessionConsumer.as_asgi())]),
    }
)
