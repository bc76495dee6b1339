"""The custom container as a process: model load latency, and memory beyond the weights with 1,000 models.

Run: ./dev bench -k container   (figures land in benchmark.extra_info and the table printed at the end)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from pytest_benchmark.fixture import BenchmarkFixture

from tests.numpy_container.test_container import ContainerProcess, Repository, linear_model, tensor

MiB = 1 << 20
LOADS = 300
MODELS = 1000
Record = Callable[[str], None]


@pytest.fixture
def container(tmp_path: Path) -> Iterator[ContainerProcess]:
    process = ContainerProcess(tmp_path, memory_bytes=4096 * MiB)
    try:
        process.start()
        yield process
    finally:
        process.stop()


def percentile_ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


@pytest.mark.parametrize(("n_in", "n_out"), [(16, 8), (512, 512)], ids=["544B", "1MiB"])
def test_container_load_latency(
    benchmark: BenchmarkFixture,
    container: ContainerProcess,
    tmp_path: Path,
    record: Record,
    quick: bool,
    n_in: int,
    n_out: int,
) -> None:
    path, _, _ = linear_model(tmp_path / "model", n_in, n_out)
    repo = Repository(container.address)
    names = (f"m{i}" for i in count())
    samples = []
    loads = 5 if quick else LOADS
    for _ in range(loads):  # every load is a new model name: a real read, never the already-loaded no-op
        started = time.perf_counter()
        repo.load(next(names), path)
        samples.append(time.perf_counter() - started)
    rounds = 2 if quick else 50
    benchmark.pedantic(repo.load, setup=lambda: ((next(names), path), {}), rounds=rounds, iterations=1)
    repo.close()
    weight_bytes = (n_in * n_out + n_out) * 4
    p50, p95 = percentile_ms(samples, 0.5), percentile_ms(samples, 0.95)
    benchmark.extra_info.update(
        weight_bytes=weight_bytes, load_p50_ms=round(p50, 3), load_p95_ms=round(p95, 3)
    )
    line = f"load of a {weight_bytes} B model over gRPC: p50 {p50:.2f} ms, p95 {p95:.2f} ms ({loads} loads)"
    record(line)
    print("\n" + line)


def test_container_memory_with_1000_models(
    benchmark: BenchmarkFixture, container: ContainerProcess, tmp_path: Path, record: Record, quick: bool
) -> None:
    n_models = 20 if quick else MODELS
    models = [linear_model(tmp_path / f"m{i:04d}", 16, 8, seed=i) for i in range(n_models)]
    declared_bytes = sum(W.nbytes + b.nbytes for _, W, b in models)
    repo = Repository(container.address)
    rss_start = container.rss_bytes()
    started = time.perf_counter()
    for i, (path, _, _) in enumerate(models):
        repo.load(f"m{i:04d}", path)
    load_all_s = time.perf_counter() - started
    repo.close()
    rss_loaded = container.rss_bytes()
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    inputs = [tensor("INPUT", x)]
    rng = np.random.default_rng(1)
    with grpcclient.InferenceServerClient(container.address) as client:
        for i in range(n_models):  # every model answers once (and any lazily touched memory is counted)
            client.infer(f"m{i:04d}", inputs)
        rss_served = container.rss_bytes()
        result = benchmark.pedantic(
            lambda: client.infer(f"m{rng.integers(n_models):04d}", inputs),
            rounds=3 if quick else 300,
            iterations=1,
        )
    assert result.as_numpy("OUTPUT").shape == (1, 8)
    beyond_bytes = rss_served - rss_start - declared_bytes
    benchmark.extra_info.update(
        models=n_models,
        declared_bytes=declared_bytes,
        rss_start_bytes=rss_start,
        rss_growth_loaded_bytes=rss_loaded - rss_start,
        rss_growth_served_bytes=rss_served - rss_start,
        beyond_weights_per_model_bytes=round(beyond_bytes / n_models),
        load_all_s=round(load_all_s, 2),
        load_mean_ms=round(load_all_s / n_models * 1e3, 3),
    )
    line = (
        f"{n_models} models ({declared_bytes / 1024:.0f} KiB of weights): RSS {rss_start / MiB:.1f} MiB -> "
        f"{rss_loaded / MiB:.1f} MiB loaded -> {rss_served / MiB:.1f} MiB after one call each; "
        f"{beyond_bytes / n_models / 1024:.1f} KiB per model beyond weights; all loaded in {load_all_s:.1f} s"
    )
    record(line)
    print("\n" + line)
