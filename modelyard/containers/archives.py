"""Every container backend's archive check, registered with the catalog (which imports no backend).

Each program that checks archives (the `modelyard models` commands, the tests) calls
`register_archive_checks()` first; an archive of a backend left unregistered is refused
(catalog/modelstore.py `NoArchiveCheck`), never stored unchecked. The checks import their backend when an
archive of it is checked: MLServer's adapter pulls in gRPC, our container's check numpy, and `modelyard
models --help` needs neither.
"""

from __future__ import annotations

from pathlib import Path

from modelyard.catalog.modelstore import Manifest, register_archive_check


def _triton(root: Path, manifest: Manifest) -> int:
    from modelyard.containers.triton.archive import check_archive

    return check_archive(root, manifest)


def _custom(root: Path, manifest: Manifest) -> int:
    from modelyard.containers.custom.archive import check_archive

    return check_archive(root, manifest)


def _mlserver(root: Path, manifest: Manifest) -> int:
    from modelyard.containers.mlserver.adapter import check_archive

    return check_archive(root, manifest)


def _sagemaker(root: Path, manifest: Manifest) -> int:
    from modelyard.containers.sagemaker.archive import check_archive

    return check_archive(root, manifest)


def register_archive_checks() -> None:
    """Registers the check of each backend the catalog knows (idempotent)."""
    register_archive_check("triton", _triton)
    register_archive_check("custom", _custom)
    register_archive_check("mlserver", _mlserver)
    register_archive_check("sagemaker", _sagemaker)
