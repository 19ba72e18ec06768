"""The library side of cohort runs: sharding, and the shared tuned-baselines cache that the ranks
of one run (or two runs on one dataset) fill once."""

from __future__ import annotations

import threading
import time

from ldm.core.cohort import shard
from ldm.core.distributed import DistInfo
from ldm.core.files import cached_json


def test_shard_gives_every_case_to_exactly_one_rank():
    names = [f"c{i}" for i in range(5)]
    parts = [shard(names, DistInfo(r, r, 2)) for r in range(2)]
    assert parts == [["c0", "c2", "c4"], ["c1", "c3"]]
    assert shard(names, DistInfo()) == names


def test_cached_json_computes_once_while_the_others_wait(tmp_path):
    path = tmp_path / "cache" / "k.json"
    calls, started, first = [], threading.Event(), []

    def slow():
        calls.append("slow")
        started.set()
        time.sleep(0.3)  # the second caller arrives while this one holds the lock
        return {"v": 1}

    t = threading.Thread(target=lambda: first.append(cached_json(path, "k", slow)))
    t.start()
    assert started.wait(10)
    second = cached_json(path, "k", lambda: calls.append("again") or {"v": 2})
    t.join()
    assert calls == ["slow"] and first == [({"v": 1}, False)] and second == ({"v": 1}, True)
    assert cached_json(path, "k2", lambda: {"v": 3}) == ({"v": 3}, False)  # another key


def test_cached_json_without_a_writable_folder_only_computes(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for _ in range(2):
        assert cached_json(blocker / "k.json", "k", lambda: {"v": 1}) == ({"v": 1}, False)
