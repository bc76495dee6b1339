"""Calls to one `scale` model through an address, from its own process, at a pace chosen by files.

`python -m tests.paced_load ADDRESS MODEL FACTOR FAST_PAUSE_S SLOW_FILE SLOW_PAUSE_S STOP_FILE` sends
KServe ModelInfer calls (10 s deadline, gRPC retries off) from 8 threads, each pausing FAST_PAUSE_S between
calls, then one thread pausing SLOW_PAUSE_S once SLOW_FILE exists, and checks every answer (OUTPUT = INPUT *
FACTOR). It prints "ready" after the first good answer and, once STOP_FILE exists, one JSON line: {"calls": n,
"failed": {status: n}, "wrong": n, "failures": [[unix_time_s, status, message], ...]}.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

DEADLINE_S = 10.0
THREADS = 8


def main(
    address: str, model: str, factor: float, fast_s: float, slow_file: Path, slow_s: float, stop_file: Path
) -> None:
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    channel = grpc.insecure_channel(address, options=[("grpc.enable_retries", 0)])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    lock = threading.Lock()
    calls, wrong, failed = [0], [0], Counter[str]()
    failures: list[list[Any]] = []
    ready = threading.Event()

    def worker(n: int) -> None:
        i = 0
        while not stop_file.exists():
            x = np.array([n * 1000 + i % 1000, 1.0], dtype=np.float32)
            i += 1
            request = service_pb2.ModelInferRequest(model_name=model)
            request.inputs.add(name="INPUT", datatype="FP32", shape=[x.size])
            request.raw_input_contents.append(x.tobytes())
            try:
                response = stub.ModelInfer(request, timeout=DEADLINE_S)
            except grpc.RpcError as exc:
                with lock:
                    calls[0] += 1
                    failed[exc.code().name] += 1
                    failures.append([time.time(), exc.code().name, exc.details()])
            else:
                out = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
                with lock:
                    calls[0] += 1
                    if not np.allclose(out, x * np.float32(factor)):
                        wrong[0] += 1
                        failures.append([time.time(), "WRONG", f"{out} != {x * factor}"])
                    elif not ready.is_set():
                        ready.set()
                        print("ready", flush=True)
            # The pace of the load, not a wait for a condition. Slow: one thread calls, evenly.
            while n and slow_file.exists() and not stop_file.exists():
                time.sleep(0.05)
            time.sleep(slow_s if slow_file.exists() else fast_s)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    figures = {"calls": calls[0], "failed": dict(failed), "wrong": wrong[0]}
    print(json.dumps({**figures, "failures": failures[:200]}), flush=True)


if __name__ == "__main__":
    main(
        sys.argv[1],
        sys.argv[2],
        float(sys.argv[3]),
        float(sys.argv[4]),
        Path(sys.argv[5]),
        float(sys.argv[6]),
        Path(sys.argv[7]),
    )
