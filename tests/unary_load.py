"""One client calling one `scale` model every ~20 ms through an address, from its own process.

`python -m tests.unary_load ADDRESS MODEL FACTOR STOP_FILE [--wait-for-ready]` sends KServe ModelInfer calls
(10 s deadline, gRPC retries off, fresh input each; with --wait-for-ready a call made while the channel
reconnects waits for the connection within its deadline instead of failing at once) and checks every
answer (OUTPUT = INPUT * FACTOR). It prints "ready" after the first good answer and, once STOP_FILE exists,
one JSON line: {"calls": n, "failed": {status: n}, "wrong": n, "slowest_s": s, "failures": [[unix_time_s,
status, message], ...]}.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

DEADLINE_S = 10.0
PAUSE_S = 0.02


def main(address: str, model: str, factor: float, stop_file: Path, wait_for_ready: bool = False) -> None:
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    channel = grpc.insecure_channel(address, options=[("grpc.enable_retries", 0)])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    calls, wrong, failed = 0, 0, Counter[str]()
    failures: list[list[Any]] = []
    said_ready = False
    slowest_s = 0.0
    while not stop_file.exists():
        x = np.array([calls % 1000, 1.0], dtype=np.float32)
        request = service_pb2.ModelInferRequest(model_name=model)
        request.inputs.add(name="INPUT", datatype="FP32", shape=[x.size])
        request.raw_input_contents.append(x.tobytes())
        calls += 1
        started = time.monotonic()
        try:
            response = stub.ModelInfer(request, timeout=DEADLINE_S, wait_for_ready=wait_for_ready)
        except grpc.RpcError as exc:
            failed[exc.code().name] += 1
            failures.append([time.time(), exc.code().name, exc.details()])
        else:
            slowest_s = max(slowest_s, time.monotonic() - started)
            out = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
            if not np.allclose(out, x * np.float32(factor)):
                wrong += 1
                failures.append([time.time(), "WRONG", f"{out} != {x * factor}"])
            elif not said_ready:
                said_ready = True
                print("ready", flush=True)
        time.sleep(PAUSE_S)  # the pace of the load, not a wait for a condition
    figures = {"calls": calls, "failed": dict(failed), "wrong": wrong, "slowest_s": slowest_s}
    print(json.dumps({**figures, "failures": failures[:200]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4]), "--wait-for-ready" in sys.argv[5:])
