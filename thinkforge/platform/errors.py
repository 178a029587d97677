"""The control plane's error tree. Domain code raises these; one handler turns them into HTTP.

::

    PlatformError                      500 server_error
     ├── InvalidRequest                400 invalid_request_error
     │    └── InvalidFile              400 invalid_request_error / invalid_file
     ├── AuthenticationFailed          401 authentication_error
     ├── PermissionDenied              403 permission_error
     ├── NotFound                      404 not_found_error
     ├── Conflict                      409 conflict_error
     │    └── IdempotencyInFlight      409 conflict_error / idempotency_in_flight
     ├── IdempotencyMismatch           422 idempotency_error
     ├── PayloadTooLarge               413 invalid_request_error / payload_too_large
     └── Unavailable                   503 service_unavailable

Every message says what to do about it. The HTTP body is always
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class PlatformError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(PlatformError):
    status_code = 400
    type = "invalid_request_error"


class InvalidFile(InvalidRequest):
    code = "invalid_file"


class AuthenticationFailed(PlatformError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(PlatformError):
    status_code = 403
    type = "permission_error"


class NotFound(PlatformError):
    status_code = 404
    type = "not_found_error"
    code = "not_found"


class Conflict(PlatformError):
    status_code = 409
    type = "conflict_error"


class IdempotencyInFlight(Conflict):
    code = "idempotency_in_flight"


class IdempotencyMismatch(PlatformError):
    status_code = 422
    type = "idempotency_error"
    code = "idempotency_key_reused"


class PayloadTooLarge(PlatformError):
    status_code = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Unavailable(PlatformError):
    status_code = 503
    type = "service_unavailable"


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def first_error_location(exc: ValidationError) -> tuple[str, str]:
    """The dotted location and message of a pydantic error's first problem."""
    err = exc.errors()[0]
    return ".".join(str(p) for p in err["loc"]), str(err["msg"])
