"""Every WebSocket route of the project, gathered from the apps."""

from sessions_app.routing import websocket_urlpatterns as session_routes

websocket_urlpatterns = [*session_routes]
