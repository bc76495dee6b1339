"""The router's own errors, of the one family in modelyard/errors.py (status on the class; handlers.py
maps them at the servicer's edge), and the reading of a container's in-stream error message."""

from __future__ import annotations

import re
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from modelyard.errors import BadRequest as BadRequest
from modelyard.errors import DeadlineExceeded as DeadlineExceeded
from modelyard.errors import FailedPrecondition, ModelyardError, ResourceExhausted, Unavailable
from modelyard.errors import ModelNotFound as ModelNotFound

M = TypeVar("M", bound=Message)


def parse_request(message_type: type[M], data: bytes) -> M:
    """`data` decoded as `message_type`; bytes that do not decode are INVALID_ARGUMENT naming the type."""
    try:
        return message_type.FromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise BadRequest(f"malformed {message_type.__name__}: {exc}") from exc


class NoReadyCopy(Unavailable):
    """A model has no ready copy (and none became ready within the call's deadline)."""


class NoController(FailedPrecondition):
    """A model needs placing and no placement controller leads (nothing would ever place it)."""


class NotReady(Unavailable):
    """The router has not loaded the routing table yet."""


class UpstreamFailed(ModelyardError):
    """A container's stream failed; the router's stream ends with the same status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details, code)


class TooManyUpstreams(ResourceExhausted):
    """One client stream asked for more upstream streams than the router keeps open for it."""


# Containers answer a streamed request that fails with a bare `error_message`: Triton 2.51 puts no status
# code on it (its `triton_grpc_error` header came later), nor does our container. For the causes we know,
# the code is read from their words — the same codes their unary calls return for those causes.
_STREAM_ERROR_CODES = (
    # Ours (router/sequences.py SequenceLost), for a call of a sequence whose copy no longer holds it.
    (re.compile(r"^sequence .* is lost: .*start it again with sequence_start$"), grpc.StatusCode.ABORTED),
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


class ContainerStreamError(ModelyardError):
    """A container answered a streamed request with an error message (no status code travels with it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, stream_error_code(message))
