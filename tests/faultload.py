"""Steady load through the router from its own process, for the fault-injection tests and the soak.

`python -m tests.faultload ADDRESS STOP_FILE MODEL=FACTOR [MODEL=FACTOR ...] [--streams]` calls each model
(a `scale` model: OUTPUT = INPUT * FACTOR) from two threads with unary `Router.Infer` calls (and, with
`--streams`, from one more with `Router.InferStream`), each with a 10 s deadline and a fresh input, checking
every answer. It prints "ready" once every model has answered, and when STOP_FILE appears one JSON line:
{"calls": {model: n}, "failed": {status: n}, "wrong": n, "failures": [[unix_time_s, model, kind, status,
message], ...] (the first 200)}. gRPC retries are off: every failure the router lets through is counted.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

DEADLINE_S = 10.0
PAUSE_S = 0.01  # between one thread's calls: steady load that leaves the 2-core machine to the fleet
KEPT_FAILURES = 200


class Load:
    def __init__(self, address: str, models: dict[str, float]) -> None:
        import grpc

        self.models = models
        options = [("grpc.enable_retries", 0)]
        self.channel = grpc.insecure_channel(address, options=options)
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.wrong = 0
        self.failures: list[list[Any]] = []
        self.answered: set[str] = set()
        self.right = 0  # calls answered, and answered right

    def request(self, model: str, seq: int) -> tuple[Any, Any]:
        import numpy as np

        from modelyard.v1 import inference_pb2

        x = np.array([seq % 1000, 1.0, -2.5], dtype=np.float32)
        req = inference_pb2.InferRequest(model_name=model, id=str(seq))
        req.inputs.add(name="INPUT", datatype="FP32", shape=[x.size])
        req.raw_input_contents.append(x.tobytes())
        return req, x * np.float32(self.models[model])

    def record(self, model: str, kind: str, out: Any, expected: Any, error: Any) -> None:
        import numpy as np

        with self.lock:
            self.calls[model] += 1
            if error is not None:
                status = error.code().name if hasattr(error, "code") else type(error).__name__
                self.failed[status] += 1
                if len(self.failures) < KEPT_FAILURES:
                    details = error.details() if hasattr(error, "details") else str(error)
                    self.failures.append([time.time(), model, kind, status, details])
            elif out is None or not np.allclose(out, expected):
                self.wrong += 1
                if len(self.failures) < KEPT_FAILURES:
                    self.failures.append([time.time(), model, kind, "WRONG", f"{out} != {expected}"])
            else:
                self.answered.add(model)
                self.right += 1

    def unary(self, model: str, stop: threading.Event) -> None:
        import grpc
        import numpy as np

        from modelyard.v1 import router_pb2_grpc

        stub = router_pb2_grpc.RouterStub(self.channel)
        seq = 0
        while not stop.is_set():
            seq += 1
            req, expected = self.request(model, seq)
            try:
                response = stub.Infer(req, timeout=DEADLINE_S)
                out = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
                self.record(model, "unary", out, expected, None)
            except grpc.RpcError as exc:
                self.record(model, "unary", None, expected, exc)
            stop.wait(PAUSE_S)

    def stream(self, models: list[str], stop: threading.Event) -> None:
        import grpc
        import numpy as np

        from modelyard.v1 import router_pb2_grpc

        stub = router_pb2_grpc.RouterStub(self.channel)
        seq = 0
        while not stop.is_set():
            seq += 1
            model = models[seq % len(models)]
            req, expected = self.request(model, seq)
            try:
                responses = list(stub.InferStream(req, timeout=DEADLINE_S))
                answers = [r for r in responses if r.raw_output_contents]
                out = np.frombuffer(answers[0].raw_output_contents[0], dtype=np.float32) if answers else None
                self.record(model, "stream", out if len(answers) == 1 else None, expected, None)
            except grpc.RpcError as exc:
                self.record(model, "stream", None, expected, exc)
            stop.wait(PAUSE_S)

    def figures(self) -> dict[str, Any]:
        with self.lock:
            return {
                "calls": dict(self.calls),
                "failed": dict(self.failed),
                "wrong": self.wrong,
                "failures": list(self.failures),
            }


class Loader:
    """The caller process: started, waited for a first answer from every model, stopped for its figures."""

    def __init__(
        self, address: str, folder: Path, factors: dict[str, float], *, streams: bool = False
    ) -> None:
        self.stop_file = folder / f"stop-{time.monotonic_ns()}"
        models = [f"{m}={f}" for m, f in factors.items()]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.faultload", address, str(self.stop_file), *models]
            + (["--streams"] if streams else []),
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.figures: dict[str, Any] | None = None
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 90)
        line = self.process.stdout.readline().strip() if ready else "(nothing)"
        if line != "ready":
            self.process.kill()
            raise AssertionError(f"the caller never had an answer from every model: {line}")

    def progress(self) -> tuple[int, int]:
        """Calls made and calls answered right so far (as of the last tenth of a second)."""
        path = Path(str(self.stop_file) + ".calls")
        if not path.exists():
            return 0, 0
        made, right = path.read_text().split()
        return int(made), int(right)

    def calls(self) -> int:
        """Calls made so far (as of the last tenth of a second)."""
        return self.progress()[0]

    def wait_for_more_calls(self, count: int, ceiling_s: float = 30.0) -> None:
        """Waits until `count` more calls have been made: the load went on past the fault's recovery."""
        self._wait_for(0, count, "calls", ceiling_s)

    def wait_for_more_answers(self, count: int, ceiling_s: float = 30.0) -> None:
        """Waits until `count` more calls have been answered right (e.g. the caller reconnected)."""
        self._wait_for(1, count, "right answers", ceiling_s)

    def _wait_for(self, which: int, count: int, what: str, ceiling_s: float) -> None:
        target = self.progress()[which] + count
        started = time.monotonic()
        while self.progress()[which] < target:
            assert self.process.poll() is None, "the caller process exited"
            assert time.monotonic() - started < ceiling_s, f"fewer than {count} {what} in {ceiling_s:.0f} s"
            time.sleep(0.1)  # the caller writes its progress every tenth of a second

    def stop(self) -> dict[str, Any]:
        if self.figures is None:
            self.stop_file.touch()
            try:
                out, _ = self.process.communicate(timeout=60)
            finally:
                self.process.kill()
            self.figures = json.loads(out.strip().splitlines()[-1])
        return self.figures

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str]) -> None:
    address, stop_file, *rest = argv
    streams = "--streams" in rest
    models = {m: float(f) for m, _, f in (arg.partition("=") for arg in rest if arg != "--streams")}
    load = Load(address, models)
    stop = threading.Event()
    threads = [
        threading.Thread(target=load.unary, args=(model, stop), daemon=True)
        for model in models
        for _ in range(2)
    ]
    if streams:
        threads.append(threading.Thread(target=load.stream, args=(list(models), stop), daemon=True))
    for thread in threads:
        thread.start()
    ready_by = time.monotonic() + 60
    while load.answered != set(models) and time.monotonic() < ready_by:
        time.sleep(0.05)
    print("ready" if load.answered == set(models) else "not ready", flush=True)
    progress = Path(stop_file + ".calls")
    while not Path(stop_file).exists():
        # Calls made so far, for callers that wait for more calls after a fault (written whole, then renamed).
        with load.lock:
            made, right = sum(load.calls.values()), load.right
        progress.with_suffix(".tmp").write_text(f"{made} {right}")
        progress.with_suffix(".tmp").replace(progress)
        time.sleep(0.1)  # a file, not a signal: the caller reads the figures after its own assertions
    stop.set()
    for thread in threads:
        thread.join(DEADLINE_S + 5)
    print(json.dumps(load.figures()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
