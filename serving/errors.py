"""The one error type of the model server, with gRPC and HTTP renderings.

Every failure a request can meet is raised as `ServingError(code, message)` where `code` is
a canonical `grpc.StatusCode`. The gRPC front end aborts the call with that code; the REST
front end answers `{"error": message}` with the HTTP status TensorFlow Serving uses for the
same canonical code (`http_status`).
"""

from __future__ import annotations

import grpc

__all__ = [
    "ServingError", "http_status", "invalid_argument", "not_found", "failed_precondition",
    "unavailable", "internal", "unimplemented", "resource_exhausted", "code_from_tf_error",
    "code_from_number",
]

# TensorFlow Serving's mapping from canonical codes to HTTP statuses.
_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """A request failure carrying its canonical status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return http_status(self.code)

    def __repr__(self) -> str:
        return f"ServingError({self.code.name}, {self.message!r})"


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status TensorFlow Serving answers for a canonical code."""
    return _HTTP_STATUS.get(code, 500)


def code_from_number(number: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` of a canonical code number (as in tensorflow.error.Code)."""
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def code_from_tf_error(error: BaseException) -> grpc.StatusCode:
    """The canonical code of a `tf.errors.OpError` (UNKNOWN for anything else)."""
    number = getattr(error, "error_code", None)
    return code_from_number(number) if isinstance(number, int) else grpc.StatusCode.UNKNOWN


def invalid_argument(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def failed_precondition(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def unavailable(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNAVAILABLE, message)


def internal(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INTERNAL, message)


def unimplemented(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNIMPLEMENTED, message)


def resource_exhausted(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
