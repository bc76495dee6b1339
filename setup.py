"""Compiles protos/modelyard/v1/*.proto into the modelyard.v1 package at build time (never hand-edited)."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop
from setuptools.command.egg_info import egg_info

ROOT = Path(__file__).resolve().parent


def compile_protos() -> None:
    from grpc_tools import protoc  # build requirement

    proto_root = ROOT / "protos"
    sources = sorted(
        str(p.relative_to(proto_root)) for p in (proto_root / "modelyard" / "v1").glob("*.proto")
    )
    out = ROOT
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + ", ".join(sources))


class BuildPy(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


class Develop(develop):
    def run(self) -> None:
        compile_protos()
        super().run()


class EggInfo(egg_info):
    def run(self) -> None:
        compile_protos()
        super().run()


setup(cmdclass={"build_py": BuildPy, "develop": Develop, "egg_info": EggInfo})
