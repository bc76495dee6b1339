"""Load from the client host: through both routers in turn (a Service's round robin) and one zero-hop client.

`python -m tests.cluster.load ROUTERS STOP_FILE SECRET_FILE MODEL=FACTOR [...]` where ROUTERS is
`a:port,b:port`. tests/faultload.py's unary and streaming callers (10-s deadlines, every answer checked) go
through one channel that alternates between the routers call by call (gRPC's round_robin over both
addresses); a zero-hop client (modelyard.client.Client, following the first router's table) calls each
model directly. Prints "ready", then on STOP_FILE one JSON line: faultload's figures plus `failed_by_model`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.faultload import DEADLINE_S, PAUSE_S, Load


class ClusterLoad(Load):
    def __init__(self, routers: list[str], models: dict[str, float], secret: str) -> None:
        import grpc

        super().__init__(routers[0], models)
        self.channel.close()
        options = [("grpc.enable_retries", 0), ("grpc.lb_policy_name", "round_robin")]
        self.channel = grpc.insecure_channel("ipv4:" + ",".join(routers), options=options)
        self.routers = routers
        self.secret = secret
        self.failed_by_model: Counter[str] = Counter()
        self.calls_by_kind: Counter[str] = Counter()

    def record(self, model: str, kind: str, out: Any, expected: Any, error: Any) -> None:
        with self.lock:
            self.calls_by_kind[kind] += 1
            if error is not None:
                self.failed_by_model[model] += 1
        super().record(model, kind, out, expected, error)

    def zero_hop(self, stop: threading.Event) -> None:
        import numpy as np
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        from modelyard.client import Client

        models = list(self.models)
        with Client(self.routers[0], fleet_secret=self.secret) as client:
            client.wait_synced(10)
            seq = 0
            while not stop.is_set():
                seq += 1
                model = models[seq % len(models)]
                _, expected = self.request(model, seq)
                x = np.array([seq % 1000, 1.0, -2.5], dtype=np.float32)
                tensor = grpcclient.InferInput("INPUT", [3], "FP32")
                tensor.set_data_from_numpy(x)
                try:
                    result = client.infer(model, [tensor], client_timeout=DEADLINE_S)
                    self.record(model, "zero-hop", result.as_numpy("OUTPUT"), expected, None)
                except InferenceServerException as exc:
                    self.record(model, "zero-hop", None, expected, _Failure(exc))
                stop.wait(PAUSE_S)

    def figures(self) -> dict[str, Any]:
        figures = super().figures()
        with self.lock:
            figures["failed_by_model"] = dict(self.failed_by_model)
            figures["calls_by_kind"] = dict(self.calls_by_kind)
        return figures


class _Failure:
    """A tritonclient error shaped like a grpc.RpcError for `Load.record`."""

    def __init__(self, exc: Any) -> None:
        self.exc = exc

    def code(self) -> Any:
        class Code:
            name = str(self.exc.status() or "UNKNOWN").removeprefix("StatusCode.")

        return Code

    def details(self) -> str:
        return str(self.exc.message())


def main(argv: list[str]) -> None:
    routers, stop_file, secret_file, *rest = argv
    models = {m: float(f) for m, _, f in (arg.partition("=") for arg in rest)}
    load = ClusterLoad(routers.split(","), models, Path(secret_file).read_text().strip())
    stop = threading.Event()
    threads = [threading.Thread(target=load.unary, args=(m, stop), daemon=True) for m in models]
    threads.append(threading.Thread(target=load.stream, args=(list(models), stop), daemon=True))
    threads.append(threading.Thread(target=load.zero_hop, args=(stop,), daemon=True))
    for thread in threads:
        thread.start()
    ready_by = time.monotonic() + 60
    while load.answered != set(models) and time.monotonic() < ready_by:
        time.sleep(0.05)
    print("ready" if load.answered == set(models) else f"not ready: {load.figures()}", flush=True)
    progress = Path(stop_file + ".calls")
    while not Path(stop_file).exists():
        with load.lock:
            made = sum(load.calls.values())
        progress.with_suffix(".tmp").write_text(str(made))
        progress.with_suffix(".tmp").replace(progress)
        time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join(DEADLINE_S + 5)
    print(json.dumps(load.figures()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
