"""The cluster every scenario shares (started once: Triton and etcd take a while on 2 cores)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.cluster.cluster import Cluster
from tests.cluster.net import netns_available
from tests.conftest import missing, require_triton


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Hosts h1-h5 and a client host on private bridges, a 3-member etcd, two Tritons and one container of
    ours with their agents, two routers and two controllers; removed (processes, namespaces) at the end even
    when a test failed."""
    why = netns_available()
    if why is not None:
        missing("network namespaces", why)
    for binary in ("etcd", "etcdctl"):
        if shutil.which(binary) is None:
            missing(binary, "install Debian's etcd-server and etcd-client packages")
    require_triton()
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
