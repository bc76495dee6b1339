"""The SageMaker adapter: loads and unloads model versions on a container that speaks the SageMaker
multi-model contract over HTTP (AWS's multi-model-server with sagemaker-inference;
containers/sagemaker/process.py runs one).

The contract: `GET /ping`; `POST /models` {"model_name", "url"} (409: already loaded, 507: no memory for
it); `GET /models` (paginated: `nextPageToken`); `GET /models/{name}`; `DELETE /models/{name}`;
`POST /models/{name}/invoke`. The router invokes (router/sagemaker_forward.py); the agent does the rest.

Names. Two versions of one model share a container under names of their own, as on Triton. `name@version`
is what Triton uses, but the contract's servers do not all accept `@` (TorchServe, the other server AWS
ships for it, allows [A-Za-z0-9][A-Za-z0-9_.-]* only; MMS 1.1.11 happens to accept it), so the container
name is `NAME_vVERSION` with every `_` of NAME doubled: `my_model@3` -> `my__model_v3`. Our names and
versions use [A-Za-z0-9_.-] and start with a letter or digit, so the first single `_` (read pairs from
the left) ends the name: the spelling is unambiguous and reads back (`parse_container_name`).

Artifacts. A registered `sagemaker` artifact is the unpacked SageMaker model archive (`code/inference.py`
and the model's files) plus our manifest.json, in the model store. The container loads a model from a
directory under its model store (MMS resolves `url` against it), so the adapter links the artifact there
under the container name and sends that name as `url`: the agent and the container share a filesystem,
as SageMaker's own agent and container share /opt/ml/models. The folder holds links to the artifact's
files, not our manifest.json: MMS reads a manifest.json in a model folder as its own (legacy) format.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp

from modelyard.catalog.modelstore import file_path
from modelyard.containers.adapter import ContainerFull, LoadError
from modelyard.placement.model import ModelVersion, model_key

PAGE_SIZE = 100  # models per `GET /models` page


def container_model_name(name: str, version: str) -> str:
    """The name a SageMaker container knows one version of a model by."""
    return f"{name.replace('_', '__')}_v{version}"


def parse_container_name(container_name: str) -> tuple[str, str] | None:
    """(name, version) from `container_model_name`'s spelling; None for a name it cannot have made."""
    name: list[str] = []
    i = 0
    while i < len(container_name):
        char = container_name[i]
        if char != "_":
            name.append(char)
            i += 1
        elif container_name[i + 1 : i + 2] == "_":
            name.append("_")
            i += 2
        elif container_name[i + 1 : i + 2] == "v" and name and i + 2 < len(container_name):
            return "".join(name), container_name[i + 2 :]
        else:
            return None
    return None


def error_message(body: bytes) -> str:
    """A contract server's error in one line: MMS's JSON `message`, or the handler's text (the toolkit
    sends `message\\ntraceback`: the first line is the message)."""
    text = body.decode(errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return str(data["message"])
    first = text.splitlines()[0] if text else ""
    return first[:500]


def new_session(limit: int = 64) -> aiohttp.ClientSession:
    """A pooled client: keep-alive connections, reused across calls (made inside a running loop)."""
    connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=30)
    return aiohttp.ClientSession(connector=connector, raise_for_status=False)


class SageMakerAdapter:
    """Loads, unloads and lists model versions on one SageMaker multi-model container."""

    def __init__(self, address: str, model_store: Path, *, load_timeout_s: float = 120.0) -> None:
        """`address`: host:port of the container; `model_store`: the directory it loads models from."""
        self.address = address
        self.url = f"http://{address}"
        self.model_store = model_store
        self.load_timeout_s = load_timeout_s
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = new_session()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self, method: str, path: str, *, timeout_s: float, body: Any = None
    ) -> tuple[int, bytes]:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with self.session.request(method, self.url + path, json=body, timeout=timeout) as response:
            return response.status, await response.read()

    async def live(self) -> bool:
        try:
            status, _ = await self._request("GET", "/ping", timeout_s=2)
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False
        return status == 200

    def _link(self, model: ModelVersion, name: str) -> None:
        """The artifact under the container's model store as folder `name`: a link to each of its top-level
        files but our manifest.json, which MMS would read as its own (legacy) manifest and refuse."""
        source = file_path(model.artifact_uri)
        if source is None:
            raise LoadError(f"{model.key}: unsupported artifact URI {model.artifact_uri!r} (only file://)")
        if not (source / "code" / "inference.py").is_file():
            raise LoadError(f"{model.key}: artifact {source} has no code/inference.py")
        entries = sorted(p.name for p in source.iterdir() if p.name != "manifest.json")
        folder = self.model_store / name
        if folder.is_dir() and all(
            os.path.islink(folder / e) and os.readlink(folder / e) == str(source / e) for e in entries
        ):
            return  # linked already (a retried load)
        self.model_store.mkdir(parents=True, exist_ok=True)
        staging = self.model_store / f".{name}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for entry in entries:
            (staging / entry).symlink_to(source / entry)
        shutil.rmtree(folder, ignore_errors=True)  # links only: rmtree does not follow them
        staging.rename(folder)

    async def load(self, model: ModelVersion) -> None:
        name = container_model_name(model.name, model.version)
        await asyncio.to_thread(self._link, model, name)
        try:
            status, body = await self._request(
                "POST", "/models", timeout_s=self.load_timeout_s, body={"model_name": name, "url": name}
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise LoadError(f"{model.key}: load failed: {type(exc).__name__}: {exc}") from exc
        if status in (200, 201, 409):  # 409: already loaded (an agent restart, a retried load)
            return
        # A failed load can leave the name registered without workers (measured: MMS 1.1.11 keeps a model
        # whose load answered 507): unregister it, so a retry is a fresh load and the list stays truthful.
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            await self._request("DELETE", f"/models/{name}", timeout_s=30)
        message = f"{model.key}: load failed: HTTP {status}: {error_message(body)}"
        if status == 507:
            raise ContainerFull(f"{message} (the container is out of memory)")
        raise LoadError(message)

    async def unload(self, model: ModelVersion) -> None:
        name = container_model_name(model.name, model.version)
        try:
            status, body = await self._request("DELETE", f"/models/{name}", timeout_s=60)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise LoadError(f"{model.key}: unload failed: {type(exc).__name__}: {exc}") from exc
        if status not in (200, 202, 404):  # 404: not loaded there, which is what an unload wants
            raise LoadError(f"{model.key}: unload failed: HTTP {status}: {error_message(body)}")
        await asyncio.to_thread(shutil.rmtree, self.model_store / name, True)

    async def describe(self, model: ModelVersion) -> dict[str, Any] | None:
        """`GET /models/{name}`: the container's description of the version, None if it has none."""
        name = container_model_name(model.name, model.version)
        status, body = await self._request("GET", f"/models/{name}", timeout_s=10)
        if status == 404:
            return None
        if status != 200:
            raise LoadError(f"{model.key}: describe failed: HTTP {status}: {error_message(body)}")
        data = json.loads(body)
        return data if isinstance(data, dict) else None

    async def footprint(self, model: ModelVersion) -> int:
        """The bytes the container reports for the version's workers (MMS: `memoryUsage`; 0 if none)."""
        description = await self.describe(model) or {}
        workers = description.get("workers")
        if not isinstance(workers, list):
            return 0
        return sum(
            w["memoryUsage"]
            for w in workers
            if isinstance(w, dict) and isinstance(w.get("memoryUsage"), int) and w["memoryUsage"] > 0
        )

    async def list_models(self) -> list[str]:
        """Every model name the container lists, following `nextPageToken` to the last page."""
        names: list[str] = []
        token = ""
        for _ in range(100_000):  # a token that never ends would otherwise loop forever
            path = f"/models?limit={PAGE_SIZE}" + (f"&next_page_token={token}" if token else "")
            status, body = await self._request("GET", path, timeout_s=10)
            if status != 200:
                raise LoadError(f"listing models failed: HTTP {status}: {error_message(body)}")
            page = json.loads(body)
            if not isinstance(page, dict):
                raise LoadError("listing models failed: the answer is not a JSON object")
            names += [
                m["modelName"]
                for m in page.get("models") or ()
                if isinstance(m, dict) and isinstance(m.get("modelName"), str)
            ]
            token = page.get("nextPageToken") or ""
            if not isinstance(token, str) or not token:
                return names
        raise LoadError("listing models failed: pagination did not end")

    async def ready_versions(self) -> set[str]:
        """Keys (`name@version`) of the versions the container lists; names it cannot have been given
        by an agent (loaded by hand) are not ours and are left out."""
        keys = set()
        for container_name in await self.list_models():
            parsed = parse_container_name(container_name)
            if parsed is not None:
                keys.add(model_key(*parsed))
        return keys
