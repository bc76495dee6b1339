"""Streaming through the router: KServe ModelStreamInfer (bidi) with a real decoupled Triton model."""

from __future__ import annotations

import queue

import numpy as np
import tritonclient.grpc as grpcclient

from tests.fleet import FleetThread
from tests.test_end_to_end import fleet  # noqa: F401  (the two-Triton fleet fixture)


def collect(client: grpcclient.InferenceServerClient, sends: list[tuple[str, np.ndarray]], expect: int):  # type: ignore[no-untyped-def]
    results: queue.Queue = queue.Queue()  # type: ignore[type-arg]
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for model, values in sends:
            tensor = grpcclient.InferInput("INPUT", [values.size], "FP32")
            tensor.set_data_from_numpy(values.astype(np.float32))
            client.async_stream_infer(model, [tensor], enable_empty_final_response=model == "stream")
        return [results.get(timeout=30) for _ in range(expect)]
    finally:
        client.stop_stream()


def test_decoupled_model_streams_every_response_in_order_then_the_final_flag(fleet: FleetThread) -> None:  # noqa: F811
    values = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0], dtype=np.float32)
    with grpcclient.InferenceServerClient(fleet.address) as client:
        got = collect(client, [("stream", values)], expect=len(values) + 1)
    assert all(error is None for _, error in got)
    data = got[:-1]
    assert [r.as_numpy("OUTPUT")[0] for r, _ in data] == list(values)
    assert [r.get_response().parameters["triton_final_response"].bool_param for r, _ in got] == [False] * len(
        values
    ) + [True]


def test_one_stream_reaches_models_on_two_containers(fleet: FleetThread) -> None:  # noqa: F811
    x = np.array([1.5, -2.0], dtype=np.float32)
    with grpcclient.InferenceServerClient(fleet.address) as client:
        # scale lives on triton-0, stream on triton-1: the router opens one upstream stream to each.
        got = collect(client, [("scale", x), ("stream", x)], expect=1 + len(x) + 1)
    assert all(error is None for _, error in got)
    by_model: dict[str, list[np.ndarray]] = {}
    for result, _ in got:
        response = result.get_response()
        if response.outputs:
            by_model.setdefault(response.model_name, []).append(result.as_numpy("OUTPUT"))
    np.testing.assert_allclose(by_model["scale"][0], x * 2)
    assert [v[0] for v in by_model["stream"]] == list(x)


def test_an_unknown_model_in_a_stream_is_an_in_stream_error_and_the_stream_goes_on(
    fleet: FleetThread,
) -> None:  # noqa: F811
    x = np.array([2.0], dtype=np.float32)
    with grpcclient.InferenceServerClient(fleet.address) as client:
        got = collect(client, [("no_such_model", x), ("identity", x)], expect=2)
    errors = [error for _, error in got if error is not None]
    results = [result for result, error in got if error is None]
    assert len(errors) == 1 and "no_such_model" in str(errors[0])
    np.testing.assert_array_equal(results[0].as_numpy("OUTPUT"), x)
