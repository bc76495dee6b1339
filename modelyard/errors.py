"""The one family of errors a caller sees as a gRPC status: the status is on the class (MLServer's
`MLServerError` shape), the message is the status details.

Raised anywhere in the router and our container; each servicer maps them to a status once, at its edge
(router/handlers.py for the router's unary and streaming methods, numpy_container/container.py for our
container's). An instance may carry another status than its class's (a container's status passed on).
"""

from __future__ import annotations

import grpc


class ModelyardError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    trailers: tuple[tuple[str, str], ...] = ()  # sent with the status (e.g. grpc-retry-pushback-ms)

    def __init__(self, details: str = "", code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code


class BadRequest(ModelyardError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ModelyardError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(ModelyardError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ModelyardError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ModelyardError):
    """The request did not run (a copy or version going away, nothing ready): another copy may take it."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ModelyardError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ModelyardError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(ModelyardError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(ModelyardError):
    code = grpc.StatusCode.UNIMPLEMENTED
