"""Console routes, included under `/console/`."""

from django.contrib.auth import views as auth_views
from django.urls import path

from handover import views

urlpatterns = [
    path("", views.console, name="console"),
    path(
        "login/",
        auth_views.LoginView.as_view(template_name="handover/login.html"),
        name="console-login",
    ),
    path(
        "logout/", auth_views.LogoutView.as_view(next_page="console-login"), name="console-logout"
    ),
    path("sessions/<str:session_id>/", views.session_page, name="console-session"),
    path("api/state", views.state_json, name="console-state"),
    path("api/search", views.search_json, name="console-search"),
    path("api/sessions/<str:session_id>", views.session_json, name="console-session-json"),
    path(
        "api/sessions/<str:session_id>/diagnostics",
        views.diagnostics_json,
        name="console-diagnostics",
    ),
]
