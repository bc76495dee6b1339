"""A load generator for benchmarks/test_sagemaker.py, run as its own process: sequential calls of one
model, either through the router (KServe v2 gRPC, tritonclient) or straight to a SageMaker container
(`POST /models/{name}/invoke` with application/x-npy over one keep-alive HTTP connection).

    python benchmarks/sagemaker_load.py MODE ADDRESS MODEL FLOATS CALLS
    -> one JSON line: {"p50_ms": ..., "p90_ms": ..., "mean_ms": ..., "calls": ...}
"""

from __future__ import annotations

import http.client
import io
import json
import statistics
import sys
import time

import numpy as np

WARMUP = 20


def through_router(address: str, model: str, values: np.ndarray, calls: int) -> list[float]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    tensor = grpcclient.InferInput("INPUT", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)
    expected = values * 2
    times = []
    for i in range(WARMUP + calls):
        started = time.perf_counter()
        output = client.infer(model, [tensor]).as_numpy("OUTPUT")
        elapsed = time.perf_counter() - started
        if output is None or not np.array_equal(output, expected):
            raise SystemExit("wrong answer through the router")
        if i >= WARMUP:
            times.append(elapsed)
    client.close()
    return times


def direct(address: str, container_name: str, values: np.ndarray, calls: int) -> list[float]:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    buffer = io.BytesIO()
    np.save(buffer, values)
    body = buffer.getvalue()
    headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
    expected = values * 2
    times = []
    for i in range(WARMUP + calls):
        started = time.perf_counter()
        connection.request("POST", f"/models/{container_name}/invoke", body, headers)
        response = connection.getresponse()
        answer = response.read()
        output = np.load(io.BytesIO(answer))  # decoded as a client of the contract would
        elapsed = time.perf_counter() - started
        if response.status != 200 or not np.array_equal(output, expected):
            raise SystemExit(f"wrong answer from the container: HTTP {response.status}")
        if i >= WARMUP:
            times.append(elapsed)
    connection.close()
    return times


def main() -> None:
    mode, address, model, floats, calls = sys.argv[1:6]
    values = np.arange(int(floats), dtype=np.float32)
    run = through_router if mode == "router" else direct
    times = sorted(run(address, model, values, int(calls)))
    print(
        json.dumps(
            {
                "p50_ms": statistics.median(times) * 1000,
                "p90_ms": times[int(len(times) * 0.9)] * 1000,
                "mean_ms": statistics.fmean(times) * 1000,
                "calls": len(times),
            }
        )
    )


if __name__ == "__main__":
    main()
