"""`modelyard up`'s /metrics: the control plane's (loads, evictions, copies, memory, the leading controller,
placement failures, pass times) and the router process's (cache hits and misses, cold-call waits), with live
values as models load and go. A real `modelyard up` process, scraped over HTTP as Prometheus would."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from modelyard import metric_names as names
from modelyard.containers.triton.server import free_port
from modelyard.placement import registry
from modelyard.placement.model import ModelVersion
from modelyard.placement.store import open_store
from tests.conftest import require_triton
from tests.test_telemetry import scrape
from tests.test_up import Up

Samples = dict[str, list[tuple[dict[str, str], float]]]


def value(metrics: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    return sum(v for s, v in metrics.get(name, []) if labels.items() <= s.items())


def scrape_until(url: str, holds: Callable[[Samples], bool], what: str, timeout_s: float = 60) -> Samples:
    """Scrapes (as Prometheus would, every half second) until `holds` is true of what /metrics shows."""
    deadline = time.monotonic() + timeout_s
    while not holds(metrics := scrape(url)):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.5)
    return metrics


def register(workdir: Path, model: ModelVersion) -> None:
    async def run() -> None:
        async with open_store(str(workdir / "store")) as store:
            await registry.register_model(store, model)

    asyncio.run(run())


def infer(address: str, name: str) -> np.ndarray:
    tensor = grpcclient.InferInput("INPUT", [3], "FP32")
    tensor.set_data_from_numpy(np.array([1, 2, 3], dtype=np.float32))
    with grpcclient.InferenceServerClient(address) as client:
        return client.infer(name, [tensor], client_timeout=30).as_numpy("OUTPUT")


def test_up_shows_the_control_plane_metrics_live_as_models_load_and_are_evicted(tmp_path: Path) -> None:
    require_triton()
    port, workdir = free_port(), tmp_path / "fleet"
    up = Up(tmp_path, port, "--workdir", str(workdir), "--containers", "1", "--custom-containers", "1")
    try:
        up.read_until("press Ctrl-C", 180)
        text = "".join(up.output)
        url = re.search(r"^metrics on (http://\S+/metrics) \(controller and agents\)", text, re.M).group(1)  # type: ignore[union-attr]
        router_url = re.search(r"^router metrics on (http://\S+/metrics)$", text, re.M).group(1)  # type: ignore[union-attr]
        assert router_url != url
        ready = int("".join(up.output).count("ready on "))  # one line per example model, and the router's

        # Every example model loaded: load times by backend, its copies ready, the one controller leading.
        metrics = scrape(url)
        assert value(metrics, names.MODEL_LOAD + "_count", backend="triton") >= 1
        assert value(metrics, names.MODEL_LOAD + "_count", backend="custom") >= 1
        assert value(metrics, names.COPIES, state="ready") >= ready - 1
        assert value(metrics, names.CONTROLLER_LEADER) == 1
        assert value(metrics, names.CONTAINER_MEMORY, container="triton-0", kind="capacity") == 2 * 1024**3
        assert value(metrics, names.CONTAINER_MEMORY, container="custom-0", kind="capacity") == 1024**3
        assert value(metrics, names.CONTAINER_MEMORY, container="triton-0", kind="used") > 0
        assert value(metrics, names.AGENT_REGISTERED, container="triton-0") == 1
        assert value(metrics, names.RECONCILE + "_count") >= 1
        # add_sub wants 2 copies and this fleet has one Triton container.
        assert value(metrics, names.UNPLACED_MODELS) == 1

        # A call to a loaded model is a cache hit (the router's count, on the router process's /metrics).
        hits = value(scrape(router_url), names.CACHE_HITS)
        np.testing.assert_allclose(infer(f"127.0.0.1:{port}", "scale"), [2, 4, 6])
        scrape_until(router_url, lambda m: value(m, names.CACHE_HITS) == hits + 1, "a cache hit")

        # A model no container can take (a GPU model on CPU containers): its call is a miss, waits for the
        # controller's answer and fails with it; the controller counts the placement failure.
        gpu_model = ModelVersion("gpu_only", "1", backend="custom", kind="gpu", memory_bytes=1024)
        register(workdir, gpu_model)
        deadline = time.monotonic() + 30
        while True:  # the router follows the store: until it knows the model, the name is unknown
            with pytest.raises(InferenceServerException) as failure:
                infer(f"127.0.0.1:{port}", "gpu_only")
            if "unknown model" not in str(failure.value).lower() or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "gpu" in str(failure.value).lower(), failure.value
        scrape_until(
            router_url,
            lambda m: value(m, names.CACHE_MISSES) >= 1 and value(m, names.COLD_CALL_WAIT + "_count") >= 1,
            "a cache miss and its wait",
        )
        metrics = scrape_until(
            url, lambda m: value(m, names.PLACEMENT_FAILURES) >= 1, "the placement failure"
        )
        assert value(metrics, names.UNPLACED_MODELS) == 2

        # Removing a model evicts its copy: counted, with how long the copy had been loaded.
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "modelyard",
                "models",
                "remove",
                "identity@1",
                "--store",
                str(workdir / "store"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        metrics = scrape_until(
            url, lambda m: value(m, names.EVICTIONS, backend="triton") == 1, "the eviction of identity"
        )
        assert value(metrics, names.EVICTION_AGE + "_count", backend="triton") == 1
        assert value(metrics, names.EVICTION_AGE + "_sum", backend="triton") > 0

        status, rest = up.ctrl_c()
        assert status == 0, rest
    finally:
        up.stop()
