"""Routing errors, each with its gRPC status code on the class (handlers.py turns them into statuses)."""

from __future__ import annotations

import re
from typing import TypeVar

import grpc
from google.protobuf.message import Message


class RoutingError(Exception):
    code = grpc.StatusCode.INTERNAL


class BadRequest(RoutingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


M = TypeVar("M", bound=Message)


def parse_request(message_type: type[M], data: bytes) -> M:
    """`data` decoded as `message_type`; bytes that do not decode are INVALID_ARGUMENT naming the type."""
    try:
        return message_type.FromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise BadRequest(f"malformed {message_type.__name__}: {exc}") from exc


class ModelNotFound(RoutingError):
    code = grpc.StatusCode.NOT_FOUND


class NoReadyCopy(RoutingError):
    code = grpc.StatusCode.UNAVAILABLE


class NoController(RoutingError):
    """A model needs placing and no placement controller leads (nothing would ever place it)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


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


class TooManyUpstreams(RoutingError):
    """One client stream asked for more upstream streams than the router keeps open for it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# Containers answer a streamed request that fails with a bare `error_message`: Triton 2.51 puts no status
# code on it (its `triton_grpc_error` header came later), nor does our container. For the causes we know,
# the code is read from their words — the same codes their unary calls return for those causes.
_STREAM_ERROR_CODES = (
    (re.compile(r"unknown model|is not found|is not loaded|not registered"), grpc.StatusCode.NOT_FOUND),
    (
        re.compile(r"no available versions|is not ready|being unloaded|maximum queue size", re.IGNORECASE),
        grpc.StatusCode.UNAVAILABLE,
    ),
    (re.compile(r"timeout expired|deadline", re.IGNORECASE), grpc.StatusCode.DEADLINE_EXCEEDED),
    (
        re.compile(
            r"expected|mismatch|data-?type|shape|invalid|malformed|must|given twice|missing input",
            re.IGNORECASE,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
)


def stream_error_code(message: str) -> grpc.StatusCode:
    """The status for a container's in-stream error message; UNKNOWN only when its cause is unknown."""
    for pattern, code in _STREAM_ERROR_CODES:
        if pattern.search(message):
            return code
    return grpc.StatusCode.UNKNOWN


class ContainerStreamError(RoutingError):
    """A container answered a streamed request with an error message (no status code travels with it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = stream_error_code(message)
