"""REST routes of the handover, included under `/api/v1/`."""

from django.urls import path

from handover import api

urlpatterns = [
    path("sessions/<str:session_id>/handover", api.HandoverRequestView.as_view(), name="handover"),
    path("sessions/<str:session_id>/claim", api.ClaimView.as_view(), name="handover-claim"),
    path("sessions/<str:session_id>/release", api.ReleaseView.as_view(), name="handover-release"),
    path("sessions/<str:session_id>/close", api.CloseView.as_view(), name="handover-close"),
    path("sessions/<str:session_id>/export", api.ExportView.as_view(), name="session-export"),
]
