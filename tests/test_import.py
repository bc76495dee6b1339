"""`modelyard models import`: many versions from one JSONL file, bad lines reported by number, idempotent."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modelyard.catalog import bulk_import as bulk_import
from modelyard.catalog.bulk_import import import_models
from modelyard.catalog.modelstore import LocalModelStore
from modelyard.catalog.registration import upload
from modelyard.placement import registry
from modelyard.placement.model import ModelVersion
from modelyard.placement.store import open_store
from tests.test_registration_races import scale_archive


def write_lines(path: Path, entries: list[Any]) -> Path:
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries))
    return path


def import_cli(
    file: Path, store_url: str, artifacts: Path, *extra: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard", "models", "import", str(file),
         "--store", store_url, "--model-store", str(artifacts), *extra],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )  # fmt: skip


async def _models(store_url: str) -> dict[str, ModelVersion]:
    async with open_store(store_url) as store:
        return (await registry.load_fleet(store)).models


def registered(store_url: str) -> dict[str, ModelVersion]:
    return asyncio.run(_models(store_url))


def test_import_registers_good_lines_and_reports_each_bad_line_by_number(
    store_url: str, tmp_path: Path
) -> None:
    models = tmp_path / "catalog"
    models.mkdir()
    scale_archive(models / "archives", 2.0)  # archives/scale-2.0.tgz, named relative to the file
    archive = "archives/scale-2.0.tgz"
    file = write_lines(
        models / "models.jsonl",
        [
            {"name": "a", "version": "1", "archive": archive},
            {"name": "b", "version": 2, "archive": archive, "tenants": ["t2", "t1"], "replicas": 2,
             "kind": "any", "memory_bytes": 4096},
            "{not json",
            {"name": "c", "archive": archive},
            {"name": "d", "version": "1", "archive": "archives/missing.tgz"},
            {"name": "bad/name", "version": "1", "archive": archive},
            "",
            {"name": "e", "version": "1", "archive": archive, "replicas": 2, "max_replicas": 1},
        ],
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = import_cli(file, store_url, tmp_path / "artifacts", cwd=elsewhere)
    assert result.returncode == 2, result.stderr
    errors = result.stderr.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in errors] == [f"{file}:{n}" for n in (3, 4, 5, 6, 8)]
    assert "not valid JSON" in errors[0] and "missing version" in errors[1]
    assert "missing.tgz: No such file or directory" in errors[2]
    assert (
        "bad model name 'bad/name'" in errors[3]
        and "max replicas (1) must not be below replicas (2)" in errors[4]
    )
    assert result.stdout.startswith("imported 2, skipped 0, failed 5 in ")
    models_now = registered(store_url)
    assert sorted(models_now) == ["a@1", "b@2"]
    b = models_now["b@2"]
    assert (b.tenants, b.replicas, b.kind, b.memory_bytes, b.backend) == (
        ("t1", "t2"),
        2,
        "any",
        4096,
        "custom",
    )
    assert models_now["a@1"].memory_bytes == 4 and models_now["a@1"].tenants == ()
    assert b.sha256 == models_now["a@1"].sha256
    assert [p.name for p in (tmp_path / "artifacts").iterdir()] == [b.sha256]  # stored once


def test_importing_the_same_file_again_skips_every_line_and_changes_nothing(
    store_url: str, tmp_path: Path
) -> None:
    scale_archive(tmp_path, 2.0)
    file = write_lines(
        tmp_path / "models.jsonl",
        [{"name": f"m{i}", "version": "1", "archive": "scale-2.0.tgz"} for i in range(5)],
    )
    first = import_cli(file, store_url, tmp_path / "artifacts")
    assert first.returncode == 0 and first.stdout.startswith("imported 5, skipped 0, failed 0 in ")

    async def revisions() -> dict[str, int]:
        async with open_store(store_url) as store:
            items, _ = await store.get_prefix(registry.MODELS)
            return {item.key: item.mod_revision for item in items}

    before = asyncio.run(revisions())
    again = import_cli(file, store_url, tmp_path / "artifacts")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("imported 0, skipped 5, failed 0 in ")
    assert asyncio.run(revisions()) == before


def test_a_line_whose_version_holds_another_artifact_fails_and_the_rest_go_on(
    store_url: str, tmp_path: Path
) -> None:
    scale_archive(tmp_path, 2.0)
    other = scale_archive(tmp_path, 3.0)

    async def preregister() -> ModelVersion:
        async with open_store(store_url) as store:
            return (
                await upload(store, LocalModelStore(tmp_path / "artifacts"), other, name="x", version="1")
            ).model

    taken = asyncio.run(preregister())
    file = write_lines(
        tmp_path / "models.jsonl",
        [
            {"name": "x", "version": "1", "archive": "scale-2.0.tgz"},
            {"name": "y", "version": "1", "archive": "scale-2.0.tgz"},
            {"name": "y", "version": "1", "archive": "scale-2.0.tgz"},  # a repeat: skipped
            {"name": "y", "version": "1", "archive": "scale-3.0.tgz"},  # the same version, other bytes
        ],
    )
    result = import_cli(file, store_url, tmp_path / "artifacts")
    assert result.returncode == 2
    immutable = "versions are immutable: remove it first or upload a new version"
    y_sha = registered(store_url)["y@1"].sha256
    assert result.stderr.splitlines() == [
        f"{file}:1: x@1 already exists with another artifact ({taken.sha256[:12]}); {immutable}",
        f"{file}:4: y@1 already exists with another artifact ({y_sha[:12]}); {immutable}",
    ]
    assert result.stdout.startswith("imported 1, skipped 1, failed 2 in ")
    assert registered(store_url)["x@1"] == taken


def test_an_archive_over_the_size_limit_fails_its_lines_only(store_url: str, tmp_path: Path) -> None:
    small = scale_archive(tmp_path, 2.0)
    file = write_lines(
        tmp_path / "models.jsonl",
        [{"name": "m", "version": "1", "archive": small.name}],
    )
    result = import_cli(file, store_url, tmp_path / "artifacts", "--max-archive-bytes", "100")
    assert result.returncode == 2
    assert result.stderr.startswith(f"{file}:1: ") and "over the 100 B archive limit" in result.stderr
    assert registered(store_url) == {}


def test_an_unreadable_file_ends_the_command_with_one_line(tmp_path: Path) -> None:
    result = import_cli(tmp_path / "nope.jsonl", str(tmp_path / "store"), tmp_path / "artifacts")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: cannot read {tmp_path / 'nope.jsonl'}: No such file or directory"


def test_thousands_of_lines_naming_one_archive_check_and_store_it_once(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Counts calls into the real archive check (nothing replaced): the cache must make it one.
    checks: list[Path] = []
    real_checked = bulk_import.checked

    def counted(path: Path, *args: Any, **kwargs: Any) -> Any:
        checks.append(path)
        return real_checked(path, *args, **kwargs)

    monkeypatch.setattr(bulk_import, "checked", counted)
    scale_archive(tmp_path, 2.0)
    count = bulk_import.CHUNK_LINES + 500  # more than one chunk
    file = write_lines(
        tmp_path / "models.jsonl",
        [{"name": f"model-{i:05d}", "version": "1", "archive": "scale-2.0.tgz"} for i in range(count)],
    )

    async def main() -> bulk_import.ImportReport:
        async with open_store(store_url) as store:
            return await import_models(store, LocalModelStore(tmp_path / "artifacts"), file)

    report = asyncio.run(main())
    assert (report.imported, report.skipped, report.failed) == (count, 0, [])
    assert checks == [tmp_path / "scale-2.0.tgz"]
    assert len(list((tmp_path / "artifacts").iterdir())) == 1
    assert len(registered(store_url)) == count
