"""The harness's eyes inside the cluster: a process on the client host answering JSON requests on stdin.

The test process lives in the machine's own namespace, which has no route into the cluster, so whatever it
needs to see there (the store, the routers' tables and health) it asks this process, one JSON line per
request and one per answer: {"op": ..., ...} -> {"ok": value} or {"error": text}.

    python -m tests.cluster.probe STORE_URL FLEET_SECRET ROUTER_ADDRESS [ROUTER_ADDRESS ...]
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from typing import Any

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.placement import registry
from modelyard.placement.store import Store, StoreError, open_store
from modelyard.v1 import inference_pb2, router_pb2, router_pb2_grpc

ANSWER_S = 3.0  # a router or the store that does not answer within this counts as not agreeing


class Probe:
    def __init__(self, store_url: str, secret: str, routers: list[str]) -> None:
        self.store_url = store_url
        self.store: Store = open_store(store_url)
        self.metadata = ((FLEET_SECRET_HEADER, secret),)
        self.routers = routers
        self.channels = {r: grpc.aio.insecure_channel(r) for r in routers}

    async def router_ready(self, router: str) -> dict[str, list[str]]:
        """The router's ready copies by model key, from the snapshot WatchRoutes starts with."""
        stub = router_pb2_grpc.RouterStub(self.channels[router])
        call = stub.WatchRoutes(router_pb2.WatchRoutesRequest(), metadata=self.metadata, timeout=ANSWER_S)
        try:
            async for update in call:
                return {
                    f"{m.model_name}@{v.version}": sorted(c.container_id for c in v.ready)
                    for m in update.models
                    for v in m.versions
                }
        finally:
            call.cancel()
        raise RuntimeError(f"router {router} sent no snapshot")

    async def store_health(self, router: str) -> str:
        stub = health_pb2_grpc.HealthStub(self.channels[router])
        response = await stub.Check(
            health_pb2.HealthCheckRequest(service="modelyard.store"), timeout=ANSWER_S
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def problems(self, routers: list[str], containers: list[str]) -> list[str]:
        """Why the fleet has not converged: every container in `containers` is registered, every model has
        as many ready copies as it wants (or as live containers of its backend allow), each on a
        registered container and none counted twice, and each router's table lists exactly the store's
        ready copies."""
        try:
            async with asyncio.timeout(ANSWER_S):
                fleet = await registry.load_fleet(self.store)
        except (StoreError, TimeoutError) as exc:
            return [f"store: {exc or 'timeout'}"]
        found = [f"container {c} not registered" for c in containers if c not in fleet.containers]
        ready: dict[str, list[str]] = {}
        for key, model in fleet.models.items():
            live = [c for c in fleet.containers.values() if c.backend == model.backend]
            if all(fleet.budget_bytes(model) > c.memory_bytes for c in live):
                continue  # too big for every container: no copy is the right answer
            wanted = min(model.replicas, len(live))
            on = sorted(fleet.ready_on(key))
            ready[key] = on
            if len(on) != wanted:
                found.append(
                    f"{key}: {len(on)} ready copies on registered containers ({on}), {wanted} wanted"
                )
            counted = fleet.assignments.get(key, ())
            if len(set(counted)) != len(counted):
                found.append(f"{key}: a copy counted twice in the map: {counted}")
        for router in routers:
            try:
                seen = await self.router_ready(router)
            except grpc.aio.AioRpcError as exc:
                found.append(f"router {router}: {exc.code().name} {exc.details()}")
                continue
            except RuntimeError as exc:
                found.append(f"router {router}: {exc}")
                continue
            for key, on in ready.items():
                if seen.get(key, []) != on:
                    found.append(f"router {router}: {key} ready on {seen.get(key, [])}, store says {on}")
        return found

    async def infer(self, router: str, model: str, factor: float, deadline_s: float = 2.0) -> str:
        """One call through `router`: "ok", "wrong" or the status code's name."""
        x = np.array([1.0, 2.0], dtype=np.float32)
        request = inference_pb2.InferRequest(model_name=model)
        request.inputs.add(name="INPUT", datatype="FP32", shape=[x.size])
        request.raw_input_contents.append(x.tobytes())
        stub = router_pb2_grpc.RouterStub(self.channels[router])
        try:
            response = await stub.Infer(request, timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        out = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
        return "ok" if np.allclose(out, x * np.float32(factor)) else "wrong"

    async def handle(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        if op == "problems":
            return await self.problems(request.get("routers", self.routers), request.get("containers", []))
        if op == "store_health":
            return await self.store_health(request["router"])
        if op == "tcp":
            host, _, port = request["address"].rpartition(":")
            with socket.socket() as sock:
                sock.settimeout(1.0)
                return sock.connect_ex((host, int(port))) == 0
        if op == "put":
            return await self.store.put(request["key"], request["value"].encode())
        if op == "delete":
            return await self.store.delete(request["key"])
        if op == "get":
            item = await self.store.get(request["key"])
            return None if item is None else item.value.decode(errors="replace")
        if op == "leader":
            item = await self.store.get(registry.LEADER)
            return None if item is None else item.value.decode()
        if op == "infer":
            deadline_s = float(request.get("deadline_s", 2.0))
            return await self.infer(request["router"], request["model"], float(request["factor"]), deadline_s)
        if op == "revision":
            _, revision = await self.store.get_prefix(registry.GENERATION)
            return revision
        if op == "map_writes":
            return await self.map_writes(int(request["since"]))
        raise ValueError(f"unknown op {op!r}")

    async def map_writes(self, since: int) -> list[list[Any]]:
        """Every write to the shard map from revision `since` on, as [revision, key, writer]: the writer is
        what the same transaction put in registry.MAP_WRITER (empty when it put none)."""
        client = open_store(self.store_url)
        writes: dict[int, list[str]] = {}
        writer: dict[int, str] = {}
        watch = client.watch_prefix(registry.ROOT + "map/", since).__aiter__()
        try:
            while True:  # until the history is read: no event for a while
                try:
                    async with asyncio.timeout(2.0):
                        events = await watch.__anext__()
                except (TimeoutError, StopAsyncIteration):
                    break
                for event in events:
                    if event.key == registry.MAP_WRITER:
                        writer[event.revision] = event.value.decode()
                    else:
                        writes.setdefault(event.revision, []).append(event.key)
        finally:
            await client.close()
        return [[rev, key, writer.get(rev, "")] for rev, keys in sorted(writes.items()) for key in keys]


async def main(argv: list[str]) -> None:
    store_url, secret, *routers = argv
    probe = Probe(store_url, secret, routers)
    loop = asyncio.get_running_loop()
    print(json.dumps({"ok": "ready"}), flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        try:
            answer = {"ok": await probe.handle(json.loads(line))}
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
