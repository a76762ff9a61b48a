"""OpenAPI description of Baton's authentication (bearer agent keys and client tokens)."""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class BatonAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "sessions_app.auth.BatonAuthentication"
    name = "bearer"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An agent key (bk_…) or a session-scoped client token (ct_…).",
        }
