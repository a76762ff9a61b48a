from django.urls import path

from sessions_app import api, sse

urlpatterns = [
    path("sessions", api.SessionListView.as_view(), name="session-list"),
    path("sessions/<str:session_id>", api.SessionDetailView.as_view(), name="session-detail"),
    path(
        "sessions/<str:session_id>/events",
        api.SessionEventsView.as_view(),
        name="session-events",
    ),
    path("sessions/<str:session_id>/events/stream", sse.event_stream, name="session-stream"),
    path(
        "sessions/<str:session_id>/messages",
        api.SessionMessagesView.as_view(),
        name="session-messages",
    ),
    path(
        "sessions/<str:session_id>/presence",
        api.SessionPresenceView.as_view(),
        name="session-presence",
    ),
    path(
        "sessions/<str:session_id>/tokens",
        api.SessionTokensView.as_view(),
        name="session-tokens",
    ),
]
