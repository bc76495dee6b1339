"""A bulk import into a live `modelyard up`, as a user runs both: the fleet and the import are the real
commands, a warm caller calls through the router from a process of its own (and an anchor calls the same
model on its container directly, as the router does), and readiness is read from the controller's summary
(`modelyard models list`), so nothing of the harness runs in the fleet's processes.

Used by tests/test_twenty_thousand_models.py (CI, 20k) and benchmarks/test_live_import.py (100k).
Run as `python -m tests.live_import warm ADDRESS OUT_FILE STOP_FILE` for the warm caller alone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARCHIVES = 10  # the models share ten archives: model i computes OUTPUT = INPUT x factor(i)
PRIVATE = "acme"  # every tenth model is private to this tenant
WARM_MODEL = "scale"  # `up`'s example on Triton: OUTPUT = INPUT x 2
WARM_INPUT = [1.0, 2.0, 3.0]
WARM_EVERY_S = 0.005


def factor(i: int) -> float:
    return float(i % ARCHIVES + 1)


def name(i: int) -> str:
    return f"m{i:06d}"


def write_catalog(folder: Path, count: int) -> Path:
    """`count` JSONL lines over ARCHIVES archives (scale models of our container); every tenth private."""
    from tests.test_registration_races import scale_archive

    for k in range(ARCHIVES):
        scale_archive(folder / "archives", float(k + 1))
    with (folder / "models.jsonl").open("w") as out:
        for i in range(count):
            entry: dict[str, Any] = {
                "name": name(i),
                "version": "1",
                "archive": f"archives/scale-{factor(i)}.tgz",
            }
            if i % 10 == 3:
                entry["tenants"] = [PRIVATE]
            out.write(json.dumps(entry) + "\n")
    return folder / "models.jsonl"


# -- the warm caller (its own process) -----------------------------------------------------------------------


def warm_main(address: str, out_file: str, stop_file: str, model: str, secret_file: str = "") -> None:
    """Calls `model` every WARM_EVERY_S until `stop_file` exists; prints "ready" after its first answer;
    writes {"calls": [[wall clock, seconds], ...], "errors": [[wall clock, what], ...]} to `out_file`.
    With `secret_file`, the calls carry the fleet secret (a container called directly, as the router does)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from modelyard.fleet_secret import FLEET_SECRET_HEADER

    headers = {FLEET_SECRET_HEADER: Path(secret_file).read_text().strip()} if secret_file else None
    calls: list[tuple[float, float]] = []
    errors: list[tuple[float, str]] = []
    expected = np.array(WARM_INPUT, dtype=np.float32) * 2
    with grpcclient.InferenceServerClient(address) as client:
        while not Path(stop_file).exists():
            tensor = grpcclient.InferInput("INPUT", [len(WARM_INPUT)], "FP32")
            tensor.set_data_from_numpy(np.array(WARM_INPUT, dtype=np.float32))
            at, started = time.time(), time.perf_counter()
            try:
                out = client.infer(model, [tensor], headers=headers, client_timeout=10).as_numpy("OUTPUT")
                calls.append((at, time.perf_counter() - started))
                if not np.allclose(out, expected):
                    errors.append((at, f"wrong answer {out.tolist()}"))
            except InferenceServerException as exc:
                errors.append((at, f"{exc.status()}: {exc.message()}"))
            if len(calls) == 1 and not errors:
                print("ready", flush=True)
            time.sleep(WARM_EVERY_S)
    Path(out_file).write_text(json.dumps({"calls": calls, "errors": errors}))


@dataclass
class WarmFigures:
    calls: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: list[str]

    def line(self) -> str:
        return (
            f"{self.calls} calls, p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, "
            f"max {self.max_ms:.0f} ms, {len(self.errors)} failed or wrong"
        )


def window(figures: dict[str, Any], start: float, end: float) -> WarmFigures:
    """The warm caller's calls that began within [start, end] (wall clock)."""
    latencies_ms = sorted(1000 * s for at, s in figures["calls"] if start <= at <= end)
    errors = [what for at, what in figures["errors"] if start <= at <= end]
    if not latencies_ms:
        return WarmFigures(0, 0.0, 0.0, 0.0, errors)
    pick = lambda q: latencies_ms[min(len(latencies_ms) - 1, int(q * len(latencies_ms)))]  # noqa: E731
    return WarmFigures(len(latencies_ms), pick(0.5), pick(0.99), latencies_ms[-1], errors)


class WarmCaller:
    def __init__(
        self, address: str, folder: Path, *, name: str = "warm", model: str = WARM_MODEL, secret: str = ""
    ) -> None:
        self.out_file, self.stop_file = folder / f"{name}.json", folder / f"{name}.stop"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.live_import",
                "warm",
                address,
                str(self.out_file),
                str(self.stop_file),
                model,
                secret,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # its first call answered (or it died: "")
        assert line.strip() == "ready", "the warm caller never got an answer"

    def stop(self) -> dict[str, Any]:
        self.stop_file.touch()
        try:
            self.process.wait(30)
        finally:
            self.process.kill()
        figures: dict[str, Any] = json.loads(self.out_file.read_text())
        return figures


# -- the fleet -----------------------------------------------------------------------------------------------


class UpProcess:
    """`modelyard up` as a user starts it, in `workdir`; stopped with SIGINT (Ctrl-C), killed if it hangs."""

    def __init__(self, workdir: Path, *options: str, timeout_s: float = 300) -> None:
        from modelyard.containers.process import free_port

        self.workdir = workdir
        self.port = free_port()
        self.log = (workdir.parent / f"{workdir.name}-up.log").open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelyard",
                "up",
                "--workdir",
                str(workdir),
                "--port",
                str(self.port),
                "--http-port",
                "0",
                *options,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        log_path = Path(self.log.name)
        while "press Ctrl-C" not in (text := log_path.read_text()):
            assert self.process.poll() is None, f"modelyard up exited:\n{text[-3000:]}"
            assert time.monotonic() < deadline, (
                f"modelyard up not ready within {timeout_s:.0f} s:\n{text[-3000:]}"
            )
            time.sleep(0.5)
        self.address = f"127.0.0.1:{self.port}"
        self.store = str(workdir / "store")
        # The container holding the warm model, and its address: the anchor calls it directly.
        holder = re.search(rf"^model {WARM_MODEL}@1\s+ready on (\S+?)(?:,|$)", text, re.MULTILINE)
        assert holder is not None, text[-3000:]
        row = re.search(rf"^{holder.group(1)}\s+(\S+)\s+\d+", text, re.MULTILINE)
        assert row is not None, text[-3000:]
        self.warm_container_address = row.group(1)
        self.secret_file = str(workdir / "fleet-secret")

    def stop(self) -> None:
        import os
        import signal

        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def modelyard(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
    )


SUMMARY = re.compile(r"copies: (.*?)(?:, (\d+) lost)?$", re.MULTILINE)


def copy_counts(store: str) -> dict[str, int]:
    """The controller's count of copies by state, as `modelyard models list` prints it."""
    result = modelyard("models", "list", "--store", store, "--limit", "1")
    assert result.returncode == 0, result.stderr
    found = SUMMARY.search(result.stdout)
    assert found is not None, result.stdout
    counts: dict[str, int] = {}
    if found.group(1) == "none":  # nothing placed yet (or the controller's summary not rewritten yet)
        return counts
    for part in found.group(1).split(", "):
        number, _, state = part.partition(" ")
        counts[state] = int(number)
    return counts


def wait_all_ready(store: str, count: int, ceiling_s: float, every_s: float = 5.0) -> float:
    """Seconds until the controller counts `count` ready copies or more and none assigned or loading,
    known to within `every_s`. Each look is a `modelyard models list` process, ~0.35 s of CPU on a 100k
    store: looking every 2 s took ~17 % of a core from the fleet being timed (on 2 cores)."""
    started = time.monotonic()
    while True:
        counts = copy_counts(store)
        if counts.get("ready", 0) >= count and not counts.get("assigned") and not counts.get("loading"):
            return time.monotonic() - started
        assert time.monotonic() - started < ceiling_s, (
            f"not every copy ready within {ceiling_s:.0f} s: {counts}"
        )
        time.sleep(every_s)


@dataclass
class Imported:
    count: int
    import_s: float
    started_at: float  # wall clock
    ended_at: float
    ready_s: float  # after the import ended
    warm: dict[str, Any]  # through the router
    direct: dict[str, Any]  # the anchor: the same model called on its container directly


@contextmanager
def live_fleet(folder: Path, containers: int) -> Iterator[UpProcess]:
    up = UpProcess(folder / "fleet", "--custom-containers", str(containers))
    try:
        yield up
    finally:
        up.stop()


def import_while_warm(up: UpProcess, folder: Path, count: int, ready_ceiling_s: float) -> Imported:
    """`modelyard models import` of `count` lines while the warm caller calls; waits for every copy."""
    catalog = write_catalog(folder / "catalog", count)
    warm = WarmCaller(up.address, folder)
    direct = WarmCaller(
        up.warm_container_address, folder, name="direct", model=f"{WARM_MODEL}@1", secret=up.secret_file
    )
    try:
        time.sleep(1.0)  # a second of calls before the import: the caller's own baseline
        started_at, started = time.time(), time.monotonic()
        result = modelyard(
            "models",
            "import",
            str(catalog),
            "--store",
            up.store,
            "--model-store",
            str(up.workdir / "artifacts"),
            timeout_s=600,
        )
        import_s, ended_at = time.monotonic() - started, time.time()
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"imported {count}, skipped 0, failed 0" in result.stdout, result.stdout
        ready_s = wait_all_ready(up.store, count, ready_ceiling_s)
    finally:
        figures, anchor = warm.stop(), direct.stop()
    return Imported(count, import_s, started_at, ended_at, ready_s, figures, anchor)


def call_sample(address: str, count: int, k: int, seed: int = 30) -> list[str]:
    """Calls `k` random imported models through the router (the owner for private ones) from a process of
    its own; returns the failures."""
    import random

    from tests.test_five_thousand_models import call_through_router

    rng = random.Random(seed)
    wanted = [
        (name(i), PRIVATE if i % 10 == 3 else None, factor(i))
        for i in rng.sample(range(count), min(k, count))
    ]
    return call_through_router(address, wanted)


if __name__ == "__main__":
    if sys.argv[1] == "warm":
        warm_main(*sys.argv[2:7])
    else:
        raise SystemExit(f"unknown role {sys.argv[1]!r}")
