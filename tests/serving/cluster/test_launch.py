"""`make serve-cluster`'s launcher, the parts that need no running cluster (serving/cluster/launch.py)."""
from __future__ import annotations

import socket

import pytest

from serving.cluster.launch import Cluster, core_shares


def test_each_worker_gets_its_own_cores_as_evenly_as_they_go():
    assert core_shares(1, [0, 1]) == [[0, 1]]
    assert core_shares(2, [0, 1]) == [[0], [1]]
    assert core_shares(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]
    assert core_shares(4, [0, 1]) == [[0], [1], [0], [1]]  # more workers than cores: shared in turn


def test_bad_settings_and_a_busy_port_are_refused_before_anything_starts(demo_engine_dir):
    with pytest.raises(ValueError, match="router 'fast'"):
        Cluster(demo_engine_dir, router="fast")
    with pytest.raises(ValueError, match="workers"):
        Cluster(demo_engine_dir, workers=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        cluster = Cluster(demo_engine_dir, http_port=busy, admin_port=0)
        with pytest.raises(RuntimeError, match=f"frontend HTTP port {busy}"):
            cluster.start()
        assert not cluster.procs
