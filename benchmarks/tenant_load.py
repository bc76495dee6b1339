"""One tenant's load on one model through the router, from a process of its own (benchmarks/test_fairness.py).

`python benchmarks/tenant_load.py JSON` where JSON is
    {"address": A, "model": M, "tenant": T, "size_bytes": N, "duration_s": D,
     "rate": R (calls/s, open loop: calls start on schedule whatever the answers) or
     "concurrency": C (callers, each calling again as soon as it is answered),
     "deadline_s": 10, "honor_pushback": true}
sends KServe ModelInfer calls (FP32 INPUT of N bytes, gRPC retries off) as tenant T, prints "ready" after
the first answer, then after D seconds of calls one JSON line:
    {"ok_s": [latency of each answered call], "refused_s": [latency of each RESOURCE_EXHAUSTED],
     "codes": {status: n}, "pushback_ms": [the push-back of each refusal that carried one],
     "cpu_pct": this process's CPU while calling, in % of one core}
With honor_pushback a caller refused with `grpc-retry-pushback-ms` waits that long before its next call,
as a client with gRPC's retry policy does.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

import grpc
import grpc.aio
import numpy as np
from tritonclient.grpc import service_pb2

INFER = "/inference.GRPCInferenceService/ModelInfer"
PUSHBACK = "grpc-retry-pushback-ms"


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    x = np.ones(max(1, spec["size_bytes"] // 4), dtype=np.float32)
    message = service_pb2.ModelInferRequest(model_name=spec["model"])
    message.inputs.add(name="INPUT", datatype="FP32", shape=[x.size])
    message.raw_input_contents.append(x.tobytes())
    request = message.SerializeToString()
    metadata = (("x-tenant-id", spec["tenant"]),)
    deadline_s = float(spec.get("deadline_s", 10.0))
    honor = bool(spec.get("honor_pushback", True))
    options = [("grpc.enable_retries", 0), ("grpc.max_receive_message_length", -1)]
    result: dict[str, Any] = {"ok_s": [], "refused_s": [], "codes": Counter(), "pushback_ms": []}
    async with grpc.aio.insecure_channel(spec["address"], options=options) as channel:
        infer = channel.unary_unary(INFER)
        try:
            await infer(request, metadata=metadata, timeout=30)  # connected and warm
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # refused: the router answered, connected
                raise
        print("ready", flush=True)
        stop_at = time.monotonic() + float(spec["duration_s"])
        cpu_started, wall_started = time.process_time(), time.monotonic()

        async def one() -> float:
            """One call; returns the push-back to honour (s)."""
            started = time.perf_counter()
            try:
                await infer(request, metadata=metadata, timeout=deadline_s)
            except grpc.aio.AioRpcError as exc:
                took = time.perf_counter() - started
                result["codes"][exc.code().name] += 1
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    result["refused_s"].append(took)
                    pushback = dict(exc.trailing_metadata() or ()).get(PUSHBACK)
                    if pushback is not None:
                        result["pushback_ms"].append(int(pushback))
                        return int(pushback) / 1000 if honor else 0.0
                return 0.0
            result["ok_s"].append(time.perf_counter() - started)
            result["codes"]["OK"] += 1
            return 0.0

        if spec.get("rate"):
            period = 1.0 / float(spec["rate"])
            calls: list[asyncio.Task[float]] = []
            next_at = time.monotonic()
            while next_at < stop_at:
                calls.append(asyncio.create_task(one()))
                next_at += period
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await asyncio.gather(*calls)
        else:

            async def caller() -> None:
                while time.monotonic() < stop_at:
                    wait_s = await one()
                    if wait_s:
                        await asyncio.sleep(wait_s)

            await asyncio.gather(*(caller() for _ in range(int(spec["concurrency"]))))
        # This process's own CPU while it called: on a shared machine, the load generator's share too.
        result["cpu_pct"] = (time.process_time() - cpu_started) / (time.monotonic() - wall_started) * 100
    return result


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(json.loads(sys.argv[1])))), flush=True)
