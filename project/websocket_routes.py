"""Every WebSocket route of the project, gathered from the apps."""

from handover.routing import websocket_urlpatterns as console_routes
from sessions_app.routing import websocket_urlpatterns as session_routes

websocket_urlpatterns = [*session_routes, *console_routes]
