"""Routing errors and the one place that maps them to gRPC status codes."""

from __future__ import annotations

import grpc


class RoutingError(Exception):
    code = grpc.StatusCode.INTERNAL


class BadRequest(RoutingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(RoutingError):
    code = grpc.StatusCode.NOT_FOUND


class NoReadyCopy(RoutingError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RoutingError):
    """The call's deadline ran out while the model was being loaded for it (the load goes on)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotReady(RoutingError):
    """The router has not loaded the routing table yet."""

    code = grpc.StatusCode.UNAVAILABLE


class UpstreamFailed(Exception):
    """A container's stream failed; the router's stream ends with the same status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class ContainerStreamError(RoutingError):
    """A container answered a streamed request with an error message (no status code travels with it)."""

    code = grpc.StatusCode.UNKNOWN
