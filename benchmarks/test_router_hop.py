"""What the router's hop costs, side by side and alternating in one run: direct Triton, the router, the
zero-hop client, a minimal pass-through proxy (the floor for any Python hop) and nginx `grpc_pass` when
Debian's nginx is installed. Client, router and Triton share this machine's CPUs.

Run: ./dev bench -k router_hop -s     (each test prints its table; figures also land in extra_info)
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from backends.triton_server import free_port
from modelyard.client import Client
from modelyard.local import LocalFleet
from placement import registry
from tests.conftest import require_triton, stop_process
from tests.fleet import FleetThread

NGINX_CONF = """daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
worker_processes 1;
events {{}}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  client_max_body_size 0;
  upstream triton {{ hash $remote_addr consistent; server {upstream}; keepalive 16; }}
  server {{ listen 127.0.0.1:{port} http2; location / {{ grpc_pass grpc://triton; }} }}
}}
"""


@dataclass
class Hop:
    fleet: FleetThread
    triton: str
    router: str
    proxy: str
    nginx: str | None
    router_traced: str  # the same router with tracing (OTLP exporter) and metrics on


def _wait_listening(address: str, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    client = grpcclient.InferenceServerClient(address)
    try:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"{process.args} exited"
            try:
                if client.is_server_live():
                    return
            except Exception:
                time.sleep(0.1)
    finally:
        client.close()
    raise TimeoutError(address)


@pytest.fixture(scope="module")
def hop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hop]:
    require_triton()
    workdir = tmp_path_factory.mktemp("hop")
    thread = FleetThread(workdir, str(workdir / "store"), containers=1)

    async def setup(fleet: LocalFleet) -> None:
        models = await fleet.start_store_and_models()
        await fleet.start_containers()
        await registry.write_shard_map(
            fleet.store, {m.key: ["triton-0"] for m in models}, expected_generation=0
        )
        await fleet.start_router()
        await fleet.wait_ready(models, timeout_s=120)

    processes: list[subprocess.Popen[bytes]] = []
    try:
        thread.start(setup)
        triton = thread.fleet.tritons[0].address
        router = f"127.0.0.1:{free_port()}"
        serve = [sys.executable, "-m", "modelyard", "serve", "--store", str(workdir / "store")]
        processes.append(
            subprocess.Popen([*serve, "--port", router.rsplit(":", 1)[1]], start_new_session=True)
        )
        _wait_listening(router, processes[-1])
        router_traced = f"127.0.0.1:{free_port()}"
        traced = [*serve, "--port", router_traced.rsplit(":", 1)[1], "--traces", "otlp"]
        # Spans go to an OTLP endpoint where nothing listens: built, batched and exported (then dropped).
        otlp = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
        processes.append(
            subprocess.Popen(
                [*traced, "--metrics-port", str(free_port())],
                env=otlp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        _wait_listening(router_traced, processes[-1])
        proxy = f"127.0.0.1:{free_port()}"
        script = Path(__file__).with_name("minimal_proxy.py")
        processes.append(
            subprocess.Popen([sys.executable, str(script), proxy, triton], start_new_session=True)
        )
        _wait_listening(proxy, processes[-1])
        nginx = None
        if shutil.which("nginx"):
            port = free_port()
            conf = workdir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=workdir, upstream=triton, port=port))
            processes.append(
                subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)], start_new_session=True)
            )
            nginx = f"127.0.0.1:{port}"
            _wait_listening(nginx, processes[-1])
        yield Hop(thread, triton, router, proxy, nginx, router_traced)
    finally:
        for process in processes:
            stop_process(process)  # type: ignore[arg-type]
        thread.stop()


def tensor_of(size_bytes: int) -> tuple[grpcclient.InferInput, np.ndarray]:
    x = np.random.default_rng(0).random(size_bytes // 4, dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT", [x.size], "FP32")
    tensor.set_data_from_numpy(x)
    return tensor, x


def paths(hop: Hop) -> dict[str, Callable[..., grpcclient.InferResult]]:
    """One `infer` per path; each gets its own connection."""
    calls: dict[str, Callable[..., grpcclient.InferResult]] = {}
    for name, address in (
        ("direct", hop.triton),
        ("proxy", hop.proxy),
        ("router", hop.router),
        ("nginx", hop.nginx),
    ):
        if address:
            calls[name] = grpcclient.InferenceServerClient(address).infer
    zero_hop = Client(hop.router)
    assert zero_hop.wait_synced()
    calls["zero-hop"] = zero_hop.infer
    return calls


def p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


@pytest.mark.parametrize(
    "size_bytes, rounds, per_round",
    [(4096, 6, 60), (1 << 20, 4, 15), (16 << 20, 3, 4)],
    ids=["4KiB", "1MiB", "16MiB"],
)
def test_unary_latency_c1(benchmark, hop: Hop, size_bytes: int, rounds: int, per_round: int) -> None:  # type: ignore[no-untyped-def]
    tensor, x = tensor_of(size_bytes)
    calls = paths(hop)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for infer in calls.values():  # warm up every path
        np.testing.assert_array_equal(infer("identity", [tensor]).as_numpy("OUTPUT"), x)
    for _ in range(rounds):  # alternate so every path sees the same machine state
        for name, infer in calls.items():
            for _ in range(per_round):
                start = time.perf_counter()
                infer("identity", [tensor])
                samples[name].append(time.perf_counter() - start)
    benchmark.pedantic(calls["router"], args=("identity", [tensor]), rounds=5, iterations=1)
    direct, proxy = p50_us(samples["direct"]), p50_us(samples["proxy"])
    print(f"\n{size_bytes} B, c=1: p50 us (x direct, added vs proxy's added)")
    for name, values in samples.items():
        p50 = p50_us(values)
        added = (p50 - direct) / (proxy - direct) if proxy > direct else float("nan")
        print(f"  {name:<9} {p50:9.0f}  {p50 / direct:5.2f}x  {added:5.2f}")
        benchmark.extra_info[f"{name}_p50_us"] = round(p50)
        benchmark.extra_info[f"{name}_x_direct"] = round(p50 / direct, 3)


@pytest.mark.parametrize("size_bytes", [4096], ids=["4KiB"])
def test_unary_throughput_c8(benchmark, hop: Hop, size_bytes: int) -> None:  # type: ignore[no-untyped-def]
    tensor, _ = tensor_of(size_bytes)
    addresses = {
        "direct": hop.triton,
        "proxy": hop.proxy,
        "router": hop.router,
        "router+otel": hop.router_traced,
    }
    if hop.nginx:
        addresses["nginx"] = hop.nginx
    calls_each = 150

    def run(address: str | None, zero_hop: bool) -> float:
        clients = [
            Client(hop.router) if zero_hop else grpcclient.InferenceServerClient(address) for _ in range(8)
        ]
        if zero_hop:
            assert all(c.wait_synced() for c in clients)  # type: ignore[union-attr]
        for client in clients:
            client.infer("identity", [tensor])
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda c: [c.infer("identity", [tensor]) for _ in range(calls_each)], clients))
        elapsed = time.perf_counter() - start
        for client in clients:
            client.close()
        return 8 * calls_each / elapsed

    rates: dict[str, list[float]] = {name: [] for name in [*addresses, "zero-hop"]}
    for _ in range(2):
        for name, address in addresses.items():
            rates[name].append(run(address, False))
        rates["zero-hop"].append(run(None, True))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    direct = statistics.mean(rates["direct"])
    print(f"\n{size_bytes} B, c=8: requests/s (x direct, x proxy); router+otel = traces and metrics on")
    for name, values in rates.items():
        rate = statistics.mean(values)
        print(
            f"  {name:<9} {rate:8.0f}  {rate / direct:5.2f}x  {rate / statistics.mean(rates['proxy']):5.2f}x"
        )
        benchmark.extra_info[f"{name}_rps"] = round(rate)


def test_streaming_64_responses(benchmark, hop: Hop) -> None:  # type: ignore[no-untyped-def]
    values = np.arange(64, dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT", [64], "FP32")
    tensor.set_data_from_numpy(values)
    addresses = {"direct": hop.triton, "proxy": hop.proxy, "router": hop.router}
    if hop.nginx:
        addresses["nginx"] = hop.nginx

    def one_stream(
        client: grpcclient.InferenceServerClient, responses: queue.Queue[float]
    ) -> tuple[float, float]:
        start = time.perf_counter()
        client.async_stream_infer("stream", [tensor], enable_empty_final_response=True)
        first = responses.get(timeout=30) - start
        for _ in range(64):  # 63 more data responses and the empty final one
            last = responses.get(timeout=30)
        return first, last - start

    results: dict[str, list[tuple[float, float]]] = {name: [] for name in addresses}
    clients = {}
    for name, address in addresses.items():
        client = grpcclient.InferenceServerClient(address)
        stamps: queue.Queue[float] = queue.Queue()
        client.start_stream(callback=lambda result, error, q=stamps: q.put(time.perf_counter()))
        clients[name] = (client, stamps)
        one_stream(client, stamps)  # warm up
    for _ in range(15):
        for name, (client, stamps) in clients.items():
            results[name].append(one_stream(client, stamps))
    benchmark.pedantic(lambda: one_stream(*clients["router"]), rounds=3, iterations=1)
    for client, _ in clients.values():
        client.stop_stream()
        client.close()
    print("\nstream of 64 responses: first response / total, median ms")
    for name, runs in results.items():
        first = statistics.median(r[0] for r in runs) * 1e3
        total = statistics.median(r[1] for r in runs) * 1e3
        print(f"  {name:<9} {first:7.2f} {total:7.2f}")
        benchmark.extra_info[f"{name}_first_ms"] = round(first, 3)
        benchmark.extra_info[f"{name}_total_ms"] = round(total, 3)


def test_map_change_reaches_the_router_within(benchmark, hop: Hop) -> None:  # type: ignore[no-untyped-def]
    """Time from a store write to the router's table showing it (embedded store; see the watch)."""
    fleet = hop.fleet.fleet
    router = fleet.router
    assert router is not None
    lags: list[float] = []

    async def one(i: int) -> None:
        key = f"probe-{i}@1"
        start = time.perf_counter()
        await fleet.store.put(registry.ASSIGN + key, b'["triton-0"]')
        while key not in router.router.table.fleet.assignments:  # noqa: ASYNC110 (observing from outside)
            await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - start)
        await fleet.store.delete(registry.ASSIGN + key)

    for i in range(30):
        hop.fleet.call(one(i))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    lags.sort()
    print(
        f"\nmap change -> router table: p50 {lags[len(lags) // 2] * 1e3:.0f} ms, max {lags[-1] * 1e3:.0f} ms"
    )
    benchmark.extra_info["p50_ms"] = round(lags[len(lags) // 2] * 1e3, 1)
    benchmark.extra_info["max_ms"] = round(lags[-1] * 1e3, 1)
