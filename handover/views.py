"""The operator console: pages and the small JSON reads they use. Thin: every read is a
selector; every write goes through the REST endpoints (CSRF-checked) or the session socket."""

from collections.abc import Callable

from django.contrib.auth.decorators import login_required, permission_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie

from handover import selectors
from sessions_app.auth import OPERATE_PERMISSION
from sessions_app.errors import BatonError


def operator_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Anonymous → login page; logged in without `handover.operate` → 403."""
    return login_required(permission_required(OPERATE_PERMISSION, raise_exception=True)(view))


def _json_error(exc: BatonError) -> JsonResponse:
    return JsonResponse({"error": exc.as_dict()}, status=exc.status)


@operator_required
@ensure_csrf_cookie
def console(request: HttpRequest) -> HttpResponse:
    return render(request, "handover/console.html", {"state": selectors.console_state()})


@operator_required
@ensure_csrf_cookie
def session_page(request: HttpRequest, session_id: str) -> HttpResponse:
    try:
        overview = selectors.session_overview(session_id)
    except BatonError as exc:
        return render(request, "handover/missing.html", {"error": exc}, status=exc.status)
    return render(request, "handover/session.html", {"session": overview})


@operator_required
def state_json(request: HttpRequest) -> JsonResponse:
    """The queue and live sessions (what `/ws/console/` pushes), for polling clients."""
    return JsonResponse(selectors.console_state())


@operator_required
def search_json(request: HttpRequest) -> JsonResponse:
    query = request.GET.get("q", "")[:200]
    return JsonResponse({"query": query, "sessions": selectors.search_sessions(query=query)})


@operator_required
def session_json(request: HttpRequest, session_id: str) -> JsonResponse:
    try:
        return JsonResponse(selectors.session_overview(session_id))
    except BatonError as exc:
        return _json_error(exc)


@operator_required
def diagnostics_json(request: HttpRequest, session_id: str) -> JsonResponse:
    try:
        return JsonResponse(selectors.session_diagnostics(session_id))
    except BatonError as exc:
        return _json_error(exc)
