"""One error type for every refusal, carrying the wire code and the HTTP status it maps to."""


class BatonError(Exception):
    status = 400

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        if status is not None:
            self.status = status

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def invalid(message: str) -> BatonError:
    return BatonError("invalid_event", message, 400)


def not_found(message: str = "No such session.") -> BatonError:
    return BatonError("not_found", message, 404)


def forbidden(message: str) -> BatonError:
    return BatonError("forbidden", message, 403)


def conflict(code: str, message: str) -> BatonError:
    return BatonError(code, message, 409)


def too_large(message: str) -> BatonError:
    return BatonError("payload_too_large", message, 413)
