"""A real S3 endpoint for tests and benchmarks: moto_server as its own process on a loopback port.

`moto_server` keeps its buckets in memory: a restarted one is empty (tests put back what they need).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelyard.containers.process import stop_process_group
from modelyard.containers.triton.server import free_port

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
# Credentials moto accepts (it does not check them); the region makes boto3's defaults explicit.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "modelyard-test",
    "AWS_SECRET_ACCESS_KEY": "modelyard-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata lookup on a dev machine
}


class MotoServer:
    def __init__(self, workdir: Path, port: int | None = None, env: dict[str, str] | None = None) -> None:
        """`env`: moto's own settings, e.g. INITIAL_NO_AUTH_ACTION_COUNT=0 to check credentials."""
        self.workdir = workdir
        self.extra_env = env or {}
        self.port = port or free_port("127.0.0.1")
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "moto.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment a client (boto3, a CLI subprocess) needs to use this endpoint."""
        return {**AWS_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self, timeout_s: float = 60.0) -> None:
        if not MOTO_SERVER.exists():
            raise RuntimeError(f"{MOTO_SERVER} is missing: install the test extra (moto[server])")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.extra_env},
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self.log_path.read_text()[-2000:]}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto_server not listening within {timeout_s:.0f} s; log: {self.log_path}")

    def kill(self) -> None:
        """kill -9: the endpoint goes away mid-request, as a crashed or partitioned S3 would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process, 10)
            self.process = None

    def client(self):
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        )


@contextmanager
def moto_server(workdir: Path) -> Iterator[MotoServer]:
    server = MotoServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def aws_environment(server: MotoServer) -> Iterator[None]:
    """os.environ pointing boto3 in this process at `server` (restored afterwards)."""
    saved = {name: os.environ.get(name) for name in server.env()}
    os.environ.update(server.env())
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class PausingProxy:
    """A TCP proxy to the endpoint that holds every answer after its first `pause_after_bytes` bytes
    until `release()`: a download is then reliably in flight when a test kills the endpoint behind it.

    The one fault moto cannot produce by itself (a download it is sending when it dies: on loopback it
    sends an object faster than a test can kill it). Bytes pass unchanged; the proxy never answers itself.
    """

    def __init__(self, upstream_port: int, pause_after_bytes: int, *, throttle_first: int = 0) -> None:
        """`throttle_first`: answer that many requests with S3's own throttling answer (503 SlowDown)
        instead of forwarding them, as S3 does above a prefix's request rate (moto never throttles)."""
        self.upstream_port = upstream_port
        self.pause_after_bytes = pause_after_bytes
        self.throttle_first = throttle_first
        self.throttled = 0
        self.paused = threading.Event()  # some answer is being held
        self._released = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._closing = True
        self._released.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.throttled < self.throttle_first:
                self.throttled += 1
                threading.Thread(target=self._slow_down, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()  # the endpoint is down: the caller sees its connection dropped
                continue
            upstream.settimeout(None)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    @staticmethod
    def _slow_down(client: socket.socket) -> None:
        """Reads one request's headers (GET or HEAD: no body) and answers 503 SlowDown."""
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    return
                data += chunk
            client.sendall(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        except OSError:
            pass
        finally:
            client.close()

    def _pipe(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        sent = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if answers and sent + len(data) > self.pause_after_bytes and not self._released.is_set():
                    self.paused.set()
                    self._released.wait()
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
