"""ASGI entry point: HTTP through Django, WebSockets through Channels."""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_asgi_app = get_asgi_application()

from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

if settings.BATON_SERVE_STATIC:
    # baton.js and the console assets are small; serving them here keeps one process enough.
    django_asgi_app = ASGIStaticFilesHandler(django_asgi_app)

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from project.websocket_routes import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Credentials are read by the consumers (sessions_app.auth.authenticate_scope, also the
        # operator's session cookie, with its Origin checked); no auth middleware wraps sockets.
        "websocket": URLRouter(websocket_urlpatterns),
    }
)

# Everything loaded so far lives as long as the process: move it out of the collector's reach.
# Measured at half the knee: a full collection scanned ~134k objects in 85-92 ms, a stall that
# alone set the p99 publish->deliver latency; after the freeze it scans ~25k in 10-16 ms.
gc.freeze()
# What is allocated later (every socket's objects) is still scanned by each full collection:
# 16-21 ms at S=24, one every ~2.7 s. The third threshold (young collections between full ones,
# default 10) makes them ten times rarer; cyclic garbage simply waits longer to be freed.
gc.set_threshold(700, 10, 100)
