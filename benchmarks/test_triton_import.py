"""`models import --triton-repo REPO` against `models import FILE.jsonl` on the same 1,000 distinct Triton
models (each its own files): the command lines as users run them, against an embedded store, taking turns
round by round so a change in the machine's load reaches both alike. Target: the repository path within
1.25x of the JSONL path's median."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.conftest import Verdict
from modelyard.catalog.examples import EXAMPLES_DIR

REPO = Path(__file__).resolve().parent.parent
SIGNATURE = {
    "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}],
}


def write_models(root: Path, count: int) -> None:
    """`root/archives/mNNNNN` (our layout + manifest.json, listed in models.jsonl) and `root/repo/mNNNNN`
    (Triton's layout) holding the same config and model file per model."""
    config = (EXAMPLES_DIR / "scale" / "config.pbtxt").read_text()
    code = (EXAMPLES_DIR / "scale" / "version" / "model.py").read_text()
    lines = []
    for i in range(count):
        name = f"m{i:05d}"
        archive, model = root / "archives" / name, root / "repo" / name
        (archive / "version").mkdir(parents=True)
        (model / "1").mkdir(parents=True)
        for folder, version in ((archive, archive / "version"), (model, model / "1")):
            (folder / "config.pbtxt").write_text(config.replace('"scale"', f'"{name}"'))
            (version / "model.py").write_text(f"{code}\n# model {i}\n")
        (archive / "manifest.json").write_text(json.dumps({"backend": "triton", **SIGNATURE}))
        lines.append(json.dumps({"name": name, "version": "1", "archive": f"archives/{name}"}))
    (root / "models.jsonl").write_text("\n".join(lines) + "\n")


def run_import(args: list[str], root: Path, tag: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "modelyard", "models", "import", *args,
         "--store", str(root / f"store-{tag}"), "--model-store", str(root / f"artifacts-{tag}")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported "), done.stdout
    return time.perf_counter() - started


def test_triton_repo_import_keeps_the_bulk_import_speed(
    tmp_path: Path, quick: bool, verdict: Verdict
) -> None:
    count, rounds = (20, 1) if quick else (1_000, 3)
    write_models(tmp_path, count)
    times: dict[str, list[float]] = {"jsonl": [], "triton-repo": []}
    for round_number in range(rounds):
        times["jsonl"].append(run_import([str(tmp_path / "models.jsonl")], tmp_path, f"j{round_number}"))
        times["triton-repo"].append(
            run_import(["--triton-repo", str(tmp_path / "repo")], tmp_path, f"t{round_number}")
        )
    jsonl, repo = statistics.median(times["jsonl"]), statistics.median(times["triton-repo"])
    figure = (
        f"{count} models: --triton-repo {repo:.1f} s, JSONL {jsonl:.1f} s median of {rounds} "
        f"({repo / jsonl:.2f}x; runs {', '.join(f'{t:.1f}' for t in times['triton-repo'])} vs "
        f"{', '.join(f'{t:.1f}' for t in times['jsonl'])})"
    )
    verdict("Triton repository import", figure, "<= 1.25x JSONL import", repo <= 1.25 * jsonl)
