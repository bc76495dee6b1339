"""The S3 model store (`s3://BUCKET/PREFIX`) and the local cache of its artifacts (the agents' and the
catalog's; containers/fetching.py hands the agents' copies to containers).

Each artifact is one object, `PREFIX/<sha256>.tar`: an uncompressed tar of the model version's files,
written once (an object already there is not written again) and named by the content hash of those
files (`catalog.modelstore.tree_sha256`, computed streaming), so what is read back is verified against
its own name after unpacking. Large archives go up and come down in parts (boto3's TransferConfig), from
and to disk, never whole in memory.

boto3 takes the standard AWS configuration: `AWS_ENDPOINT_URL` (any S3-compatible store), the credential
chain (environment, profile, web identity / IRSA, instance role) and the region. Throttling and dropped
connections are retried with backoff (botocore's adaptive retry mode). Every failure a user can cause or
meet (no bucket, no or wrong credentials, endpoint down) becomes one `S3StoreError` line.

boto3 is blocking: callers on an event loop run these methods in a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from modelyard.catalog.modelstore import DEFAULT_MAX_ARCHIVE_BYTES, ArchiveError, CheckedArchive, ModelStore

log = logging.getLogger(__name__)

S3_SCHEME = "s3"
MIB = 1024 * 1024
# Parts of 16 MiB above 32 MiB: a 100 MiB archive goes in 7 parts, 4 at a time.
MULTIPART_THRESHOLD_BYTES = 32 * MIB
MULTIPART_CHUNK_BYTES = 16 * MIB
TRANSFER_THREADS = 4
RETRY_ATTEMPTS = 5  # botocore's attempts per request (throttling, 5xx, dropped connections), with backoff
DEFAULT_CACHE_BYTES = 10 * 1024**3
DEFAULT_CACHE_DIR = Path(".modelyard/artifact-cache")
_CHUNK_BYTES = MIB


class S3StoreError(ArchiveError):
    """The S3 model store cannot be used or an artifact cannot be read; one line saying why."""


def is_s3_uri(uri: str) -> bool:
    return urlparse(uri).scheme == S3_SCHEME


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key or prefix without slashes at either end) of `s3://BUCKET/KEY`."""
    parsed = urlparse(uri)
    if parsed.scheme != S3_SCHEME or not parsed.netloc:
        raise S3StoreError(f"not an S3 location: {uri!r} (expected s3://BUCKET/PREFIX)")
    return parsed.netloc, parsed.path.strip("/")


def artifact_sha256(uri: str) -> str:
    """The content hash an artifact URI names (`s3://BUCKET/PREFIX/<sha256>.tar`)."""
    _, key = parse_s3_uri(uri)
    name = key.rpartition("/")[2]
    sha = name.removesuffix(".tar")
    if not name.endswith(".tar") or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise S3StoreError(f"{uri}: not a model store artifact (expected .../<sha256>.tar)")
    return sha


def s3_client() -> Any:
    """An S3 client from the standard AWS configuration, retrying throttling with adaptive backoff."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": RETRY_ATTEMPTS, "mode": "adaptive"},
        connect_timeout=5,
        read_timeout=30,
    )
    return boto3.session.Session().client("s3", config=config)


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD_BYTES,
        multipart_chunksize=MULTIPART_CHUNK_BYTES,
        max_concurrency=TRANSFER_THREADS,
        io_chunksize=_CHUNK_BYTES,
    )


def _endpoint(client: Any) -> str:
    return str(getattr(getattr(client, "meta", None), "endpoint_url", "") or "the default endpoint")


def describe(exc: BaseException, where: str, client: Any = None) -> S3StoreError:
    """One line for what boto3 raised about `where` (an s3:// location)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ResponseStreamingError,
    )

    endpoint = _endpoint(client)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return S3StoreError(
            f"{where}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "or a role / web identity)"
        )
    if isinstance(exc, EndpointConnectionError | ConnectionError):
        return S3StoreError(f"{where}: cannot reach the S3 endpoint {endpoint} ({exc})")
    if isinstance(exc, ResponseStreamingError):
        return S3StoreError(f"{where}: the download from {endpoint} was cut off ({exc})")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or (code == "404" and where.count("/") <= 3 and status == 404):
            return S3StoreError(f"{where}: the bucket does not exist at {endpoint}")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return S3StoreError(f"{where}: the AWS credentials were refused ({code}); check them")
        if code in ("AccessDenied", "403", "Forbidden"):
            return S3StoreError(f"{where}: access denied by {endpoint}; check the credentials and policy")
        if code in ("NoSuchKey", "404", "NotFound"):
            return S3StoreError(f"{where}: no such object at {endpoint}")
        return S3StoreError(f"{where}: S3 answered {code or status}: {error.get('Message', exc)}")
    if isinstance(exc, S3UploadFailedError):
        return S3StoreError(f"{where}: upload failed: {exc}")
    if isinstance(exc, BotoCoreError):
        return S3StoreError(f"{where}: {exc}")
    if isinstance(exc, OSError):
        return S3StoreError(f"{where}: {exc.strerror or exc}")
    return S3StoreError(f"{where}: {type(exc).__name__}: {exc}")


def _files(root: Path) -> Iterator[Path]:
    """The artifact's files in path order (the order `tree_sha256` hashes them in)."""
    return iter(sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts))


def tree_sha256_streamed(root: Path) -> str:
    """`catalog.modelstore.tree_sha256`, reading each file in chunks rather than whole."""
    digest = hashlib.sha256()
    for path in _files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
                digest.update(chunk)
    return digest.hexdigest()


def pack(root: Path, target: Path) -> None:
    """An uncompressed tar of `root`'s files at `target`, the same bytes for the same files."""

    def normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
        return info

    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in _files(root):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False, filter=normalized)


def unpack(archive: Path, target: Path, max_bytes: int) -> None:
    """Unpacks one of our artifact tars into `target` (plain files and folders inside it only)."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        size = sum(m.size for m in members if m.isfile())
        if size > max_bytes:
            raise S3StoreError(f"{archive.name}: unpacks to {size} bytes, over the {max_bytes}-byte limit")
        for member in members:
            if not (member.isfile() or member.isdir()):
                raise S3StoreError(f"{archive.name}: refusing archive member {member.name!r}")
        tar.extractall(target, filter="data")


class S3ModelStore(ModelStore):
    """Artifacts as `s3://BUCKET/PREFIX/<sha256>.tar` objects; `local_path` downloads through a cache."""

    def __init__(
        self,
        uri: str,
        *,
        client: Any = None,
        cache: ArtifactCache | None = None,
        cache_dir: Path = DEFAULT_CACHE_DIR,
    ) -> None:
        """`cache_dir`: where `local_path` keeps its verified copies (unless `cache` is given)."""
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client = client
        self._cache = cache
        self._cache_dir = cache_dir
        self._checked = False  # the bucket answered once: an import of thousands of archives asks once

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client()
        return self._client

    @property
    def cache(self) -> ArtifactCache:
        if self._cache is None:
            self._cache = ArtifactCache(self._cache_dir, client=self.client, model_store=self.uri)
        return self._cache

    def key(self, sha256: str) -> str:
        return f"{self.prefix}/{sha256}.tar" if self.prefix else f"{sha256}.tar"

    def artifact_uri(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.key(sha256)}"

    def check(self) -> None:
        """Raises one clear line when the bucket is missing, the credentials fail or S3 is unreachable."""
        if self._checked:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise describe(exc, f"model store s3://{self.bucket}", self.client) from exc
        self._checked = True

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise describe(exc, f"s3://{self.bucket}/{key}", self.client) from exc
        except Exception as exc:
            raise describe(exc, f"s3://{self.bucket}/{key}", self.client) from exc

    def put(self, archive: CheckedArchive) -> str:
        """Uploads the archive's files as one tar object named by their hash (once), in parts if large."""
        return self.put_files(archive.root, archive.sha256)

    def put_files(self, root: Path, archive_sha256: str = "") -> str:
        """Uploads the files under `root` (a checked archive's, or an example model's); their URI."""
        self.check()
        sha = tree_sha256_streamed(root)
        key = self.key(sha)
        uri = self.artifact_uri(sha)
        if self._exists(key):
            return uri  # written once: the name is the content
        with tempfile.TemporaryDirectory(prefix="modelyard-s3-put-") as tmp:
            packed = Path(tmp) / f"{sha}.tar"
            pack(root, packed)
            try:
                self.client.upload_file(
                    str(packed),
                    self.bucket,
                    key,
                    ExtraArgs={"Metadata": {"modelyard-archive-sha256": archive_sha256 or sha}},
                    Config=_transfer_config(),
                )
            except Exception as exc:
                raise describe(exc, uri, self.client) from exc
        return uri

    def has(self, sha256: str) -> bool:
        return self._exists(self.key(sha256))

    def remove(self, sha256: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        except Exception as exc:
            raise describe(exc, self.artifact_uri(sha256), self.client) from exc

    def local_path(self, uri: str) -> Path:
        return self.cache.fetch(uri)


class ArtifactCache:
    """Verified local copies of S3 artifacts, `DIR/<sha256>/`, at most `max_bytes` (least recently used
    leave first).

    A download goes to a temporary file, is unpacked into a staging folder and checked against the hash
    its URI names; only then is the folder renamed into place, so the cache never holds a partial or a
    corrupt artifact, whatever fails on the way (a cut connection, a full disk, a kill).
    """

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int = DEFAULT_CACHE_BYTES,
        client: Any = None,
        model_store: str | None = None,
        max_artifact_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
    ) -> None:
        """`model_store`: when set, only artifacts under this s3:// location are fetched."""
        self.root = root
        self.max_bytes = max_bytes
        self.max_artifact_bytes = max_artifact_bytes
        self.model_store = model_store.rstrip("/") + "/" if model_store else None
        self._client = client
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.downloads = 0  # artifacts downloaded (not served from the cache), for tests and benchmarks

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _lock(self, sha: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(sha, threading.Lock())

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def fetch(self, uri: str) -> Path:
        """The artifact's files in a local folder: from the cache, else downloaded and verified."""
        sha = artifact_sha256(uri)
        if self.model_store is not None and not uri.startswith(self.model_store):
            raise S3StoreError(f"{uri}: outside the model store {self.model_store.rstrip('/')}")
        target = self.path(sha)
        with self._lock(sha):
            if target.is_dir():
                os.utime(target)  # most recently used
                return target
            self.root.mkdir(parents=True, exist_ok=True)
            self._download(uri, sha, target)
        self.evict(keep=sha)
        return target

    def _download(self, uri: str, sha: str, target: Path) -> None:
        bucket, key = parse_s3_uri(uri)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f".{sha}.", dir=self.root) as tmp:
            packed = Path(tmp) / "artifact.tar"
            try:
                self.client.download_file(bucket, key, str(packed), Config=_transfer_config())
            except Exception as exc:
                raise describe(exc, uri, self.client) from exc
            staging = Path(tmp) / "files"
            try:
                unpack(packed, staging, self.max_artifact_bytes)
            except (tarfile.TarError, OSError) as exc:
                raise S3StoreError(f"{uri}: not a readable artifact ({exc})") from exc
            packed.unlink()
            actual = tree_sha256_streamed(staging)
            if actual != sha:
                raise S3StoreError(f"{uri}: sha256 mismatch: the object's files hash to {actual}; refused")
            staging.chmod(0o755)
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():  # another process put the same artifact there first: fine
                    raise
        self.downloads += 1
        log.info("fetched %s in %.2f s", uri, time.monotonic() - started)

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every cached artifact."""
        out = []
        for entry in self.root.iterdir() if self.root.is_dir() else ():
            if entry.name.startswith(".") or not entry.is_dir():
                continue  # downloads in progress
            try:
                size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
                out.append((entry.stat().st_mtime, size, entry))
            except OSError:
                continue  # evicted meanwhile
        return out

    def evict(self, keep: str | None = None) -> None:
        """Removes least recently used artifacts until the cache is within its bound (never `keep`)."""
        entries = sorted(self.entries())
        total = sum(size for _, size, _ in entries)
        for _, size, entry in entries:
            if total <= self.max_bytes:
                break
            if entry.name == keep:
                continue
            with self._lock(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
            total -= size
