from django.contrib import admin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path
from django.views.defaults import page_not_found
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from project import demo


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """JSON for API clients, Django's page for people."""
    if request.path.startswith("/api/"):
        return JsonResponse(
            {"error": {"code": "not_found", "message": "No such endpoint."}}, status=404
        )
    return page_not_found(request, exception or Exception("not found"))


handler404 = not_found

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="demo", permanent=False)),
    path("demo/", demo.demo_index, name="demo"),
    path("demo/<str:session_id>/", demo.demo_session, name="demo-session"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("sessions_app.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
]
