"""One error family: the status on the class, raised in the router or our container, mapped to the same
status at each servicer's edge (the router's unary and streaming handlers, our container's front)."""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn

import grpc
import pytest

from modelyard.errors import ModelyardError
from modelyard.numpy_container import container
from modelyard.numpy_container.hosting import OverBudget
from modelyard.numpy_container.numpy_model import TensorError
from modelyard.router import handlers
from modelyard.router.errors import NoReadyCopy, UpstreamFailed
from modelyard.router.identity import Unauthenticated


class Context:
    """What an edge needs of a grpc.aio context: abort records the status and ends the call."""

    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str, trailers: object = ()) -> NoReturn:
        self.status = (code, details)
        self.trailers = trailers
        raise asyncio.CancelledError  # as grpc.aio's abort ends the handler


def at_router_edge(exc: Exception, *, stream: bool) -> tuple[grpc.StatusCode, str] | None:
    async def method(request: Any, context: Any) -> None:
        raise exc

    wrapped = handlers.stream_errors(method) if stream else handlers.unary_errors(method)
    context = Context()

    async def call() -> None:
        try:
            await wrapped(b"", context)
        except asyncio.CancelledError:
            pass

    asyncio.run(call())
    return context.status


ERRORS = [
    (NoReadyCopy("model 'm' version '1' has no ready copy"), grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated("no credentials"), grpc.StatusCode.UNAUTHENTICATED),
    (UpstreamFailed(grpc.StatusCode.ABORTED, "container c: aborted"), grpc.StatusCode.ABORTED),
    (OverBudget("needs 10 bytes"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TensorError("input INPUT: expected FP32"), grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("error, code", ERRORS, ids=lambda e: type(e).__name__)
def test_every_error_is_of_the_one_family_with_its_status_on_the_class(error: Exception, code: Any) -> None:
    assert isinstance(error, ModelyardError)
    assert error.code == code


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("error, code", ERRORS, ids=lambda e: type(e).__name__)
def test_the_router_edge_maps_an_error_to_its_status_alike_for_unary_and_streams(
    error: Exception, code: Any, stream: bool
) -> None:
    assert at_router_edge(error, stream=stream) == (code, str(error))


@pytest.mark.parametrize("error, code", ERRORS, ids=lambda e: type(e).__name__)
def test_our_container_edge_maps_the_same_errors_to_the_same_statuses(error: Exception, code: Any) -> None:
    assert container.status_of(error) == (code, str(error))


def test_an_unexpected_error_is_internal_at_both_edges() -> None:
    assert at_router_edge(KeyError("x"), stream=False) == (
        grpc.StatusCode.INTERNAL,
        "internal router error in method",
    )
    assert container.status_of(KeyError("x"))[0] == grpc.StatusCode.INTERNAL
