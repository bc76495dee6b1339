"""The load generator of the router benchmarks, in its own process (never in the fleet's or the router's).

It reads one JSON command per line on stdin and answers one JSON line on stdout, so one process (imports
paid once) serves a whole benchmark run. Clients and channels are made once per target and reused:

    {"op": "unary", "address": A, "model": M, "size_bytes": N, "calls": K, "concurrency": C,
     "client": "triton" | "zero-hop"}
        -> {"latencies_s": [...]} (C = 1) or {"calls_per_s": x} (C > 1); "zero-hop" is
           modelyard.client.Client following the router at A.
    {"op": "interleaved", "targets": [{"address": A, "model": M, "client": K}, ...], "size_bytes": N,
     "calls": K}
        -> {"latencies_s": [[...], ...]} per target: c = 1 calls sent to the targets in turn, one call each
           in a new random order every round, so whatever the machine does meanwhile (another process
           waking, a hop still cleaning up after its call) reaches every target alike.
    {"op": "chain", "address": A, "models": [M1, M2, ...], "size_bytes": N, "calls": K}
        -> {"latencies_s": [...]}: each call is the models called one after another, each on the previous
           one's OUTPUT (models taking INPUT and giving OUTPUT; the last must give back the input).
    {"op": "stream", "address": A, "model": M, "api": "kserve" | "infer_stream" | "session",
     "responses": 64, "runs": K}
        -> {"first_s": [...], "total_s": [...]}: one request for `responses` responses per run; kserve and
           session streams stay open across runs (as a client keeps one), InferStream is one RPC per run.

Every command also carries "secret", the fleet secret containers require. Run by
benchmarks/test_router_hop.py; `python benchmarks/loadgen.py` alone waits for commands.
"""

from __future__ import annotations

import json
import queue
import random
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as kserve

from modelyard.client import Client
from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.memory import reuse_large_buffers

OPTIONS = (("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1))
_KSERVE_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
_INFER_STREAM = "/modelyard.v1.Router/InferStream"
_INFER_SESSION = "/modelyard.v1.Router/InferSession"

Infer = Callable[[str, list[grpcclient.InferInput]], grpcclient.InferResult]
_clients: dict[tuple[str, str], Any] = {}


class _Direct:
    """tritonclient with the fleet secret on every call (containers take no call without it)."""

    def __init__(self, address: str, secret: str) -> None:
        self.client = grpcclient.InferenceServerClient(address)
        self.headers = {FLEET_SECRET_HEADER: secret}

    def infer(self, model: str, inputs: list[grpcclient.InferInput]) -> grpcclient.InferResult:
        return self.client.infer(model, inputs, headers=self.headers)

    def close(self) -> None:
        self.client.close()


def _new_client(address: str, kind: str, secret: str) -> Any:
    if kind == "zero-hop":
        client = Client(address, fleet_secret=secret)
        if not client.wait_synced(30):
            raise RuntimeError(f"zero-hop client: no routing table from {address}")
        return client
    return _Direct(address, secret)


def _client(address: str, kind: str, secret: str) -> Any:
    """One client per (target, kind), reused by every command (connections stay warm)."""
    client = _clients.get((address, kind))
    if client is None:
        client = _clients[(address, kind)] = _new_client(address, kind, secret)
    return client


def tensor_of(size_bytes: int) -> tuple[grpcclient.InferInput, np.ndarray]:
    x = np.random.default_rng(0).random(max(1, size_bytes // 4), dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT", [x.size], "FP32")
    tensor.set_data_from_numpy(x)
    return tensor, x


def unary(command: dict[str, Any]) -> dict[str, Any]:
    tensor, x = tensor_of(command["size_bytes"])
    model, calls, concurrency = command["model"], command["calls"], command["concurrency"]
    if concurrency == 1:
        infer: Infer = _client(command["address"], command["client"], command["secret"]).infer
        out = infer(model, [tensor]).as_numpy("OUTPUT")  # warm, and right
        if out is None or not np.array_equal(out, x):
            raise RuntimeError(f"{command['address']} answered wrong")
        latencies = []
        for _ in range(calls):
            start = time.perf_counter()
            infer(model, [tensor])
            latencies.append(time.perf_counter() - start)
        return {"latencies_s": latencies}
    # Concurrency C: C clients of their own (own connections), each calling in a loop on its own thread.
    clients = [
        _new_client(command["address"], command["client"], command["secret"]) for _ in range(concurrency)
    ]
    try:
        for client in clients:
            client.infer(model, [tensor])
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda c: [c.infer(model, [tensor]) for _ in range(calls)], clients))
        elapsed = time.perf_counter() - start
    finally:
        for client in clients:
            client.close()
    return {"calls_per_s": concurrency * calls / elapsed}


def interleaved(command: dict[str, Any]) -> dict[str, Any]:
    tensor, x = tensor_of(command["size_bytes"])
    calls: list[tuple[Infer, str]] = []
    for target in command["targets"]:
        infer: Infer = _client(target["address"], target["client"], command["secret"]).infer
        out = infer(target["model"], [tensor]).as_numpy("OUTPUT")  # warm, and right
        if out is None or not np.array_equal(out, x):
            raise RuntimeError(f"{target['address']} answered wrong")
        calls.append((infer, target["model"]))
    latencies: list[list[float]] = [[] for _ in calls]
    turns = list(range(len(calls)))
    shuffle = random.Random(command.get("seed", 0)).shuffle
    for _ in range(command["calls"]):
        shuffle(turns)  # each target follows each other one as often: none always cleans up after another
        for turn in turns:
            infer, model = calls[turn]
            start = time.perf_counter()
            infer(model, [tensor])
            latencies[turn].append(time.perf_counter() - start)
    return {"latencies_s": latencies}


def chain(command: dict[str, Any]) -> dict[str, Any]:
    """The client calling a pipeline's models itself, one after another (benchmarks/test_pipelines.py)."""
    _, x = tensor_of(command["size_bytes"])
    client = _client(command["address"], "triton", command["secret"])

    def call() -> np.ndarray:
        value = x
        for model in command["models"]:
            tensor = grpcclient.InferInput("INPUT", [value.size], "FP32")
            tensor.set_data_from_numpy(value)
            value = client.infer(model, [tensor]).as_numpy("OUTPUT")
        return value

    if not np.array_equal(call(), x):  # warm, and right
        raise RuntimeError(f"{command['address']} answered wrong")
    latencies = []
    for _ in range(command["calls"]):
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    return {"latencies_s": latencies}


def _stream_request(model: str, responses: int, *, final_flag: bool) -> bytes:
    request = kserve.ModelInferRequest(model_name=model, id="bench")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[responses])
    request.raw_input_contents.append(np.arange(responses, dtype=np.float32).tobytes())
    if final_flag:
        request.parameters["triton_enable_empty_final_response"].bool_param = True
    return bytes(request.SerializeToString())


class _OpenStream:
    """A bidi stream kept open across runs: requests go in through a queue, responses come out in order."""

    def __init__(self, channel: grpc.Channel, method: str, secret: str) -> None:
        self.requests: queue.Queue[bytes | None] = queue.Queue()
        metadata = ((FLEET_SECRET_HEADER, secret),)
        self.call = channel.stream_stream(method)(iter(self.requests.get, None), metadata=metadata)
        self.responses: Iterator[bytes] = iter(self.call)

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()


_channels: dict[str, grpc.Channel] = {}
_streams: dict[tuple[str, str], _OpenStream] = {}


def _channel(address: str) -> grpc.Channel:
    channel = _channels.get(address)
    if channel is None:
        channel = _channels[address] = grpc.insecure_channel(address, options=OPTIONS)
    return channel


def stream(command: dict[str, Any]) -> dict[str, Any]:
    address, api, responses = command["address"], command["api"], command["responses"]
    request = _stream_request(command["model"], responses, final_flag=True)
    firsts, totals = [], []
    for run in range(command["runs"] + 1):  # the first run warms up
        start = time.perf_counter()
        count = 0
        first = 0.0
        if api == "infer_stream":
            metadata = ((FLEET_SECRET_HEADER, command["secret"]),)
            for _ in _channel(address).unary_stream(_INFER_STREAM)(request, timeout=60, metadata=metadata):
                count += 1
                if count == 1:
                    first = time.perf_counter()
        else:
            method = _KSERVE_STREAM if api == "kserve" else _INFER_SESSION
            open_stream = _streams.get((address, method))
            if open_stream is None:
                open_stream = _OpenStream(_channel(address), method, command["secret"])
                _streams[(address, method)] = open_stream
            open_stream.requests.put(request)
            for _ in range(responses + 1):  # the data responses and the empty final one
                next(open_stream.responses)
                count += 1
                if count == 1:
                    first = time.perf_counter()
        end = time.perf_counter()
        if count != responses + 1:
            raise RuntimeError(f"{address} {api}: {count} responses, expected {responses + 1}")
        if run:
            firsts.append(first - start)
            totals.append(end - start)
    return {"first_s": firsts, "total_s": totals}


def main() -> None:
    # Every client here (direct, zero-hop, through a hop) then reuses its large buffers alike: without it
    # glibc's moving mmap threshold makes 1 MiB calls cost what the calls before them happened to free.
    reuse_large_buffers(64 * 1024**2)
    operations = {"unary": unary, "interleaved": interleaved, "chain": chain, "stream": stream}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        try:
            answer = operations[command["op"]](command)
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    for open_stream in _streams.values():
        open_stream.close()
    for client in _clients.values():
        client.close()


if __name__ == "__main__":
    main()
