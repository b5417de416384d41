"""How a distributed watch ends (in-process, a one-rank gloo group; the agreement between ranks
with threads standing for ranks): the last window is stored however the script ends, and a rank
that leaves early never waits in an exchange the others will not join."""

import contextlib
import itertools
import sqlite3
import sys
import threading
import time
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradwatch
from gradwatch.collect import distributed, patches
from gradwatch.store import read_run

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")


@pytest.fixture
def group(tmp_path, monkeypatch):
    monkeypatch.delattr(sys, "last_value", raising=False)  # (pytest keeps an earlier test's failure here)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    before = list(patches._listeners)
    yield
    for watch in [w for w in patches._listeners if w not in before]:  # left attached, as scripts leave them:
        with contextlib.suppress(Exception):  # gone, or every later backward in this process is watched too
            watch.detach()
    if dist.is_initialized():
        dist.destroy_process_group()


def train(steps: int, out, **kw):
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gradwatch.watch(model, opt, out=out, warn=False, **kw)  # default flush_every: longer than the run
    for _ in range(steps):
        loss = model(torch.randn(4, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return watch


def events(run) -> list[tuple[str, str]]:
    db = sqlite3.connect(run / "gradwatch.sqlite")
    return db.execute("SELECT kind, detail FROM events").fetchall()


def test_a_script_that_never_detaches_stores_its_last_window_at_exit(group, tmp_path):
    """Before, a watched DDP run that neither detached nor destroyed its group (scripts end so)
    stored nothing of the steps since the last flush: a run shorter than one flush, nothing."""
    original = dist.destroy_process_group
    watch = train(7, tmp_path / "run")
    assert watch._dist._at_exit is not None  # registered with atexit; called here as Python would
    watch._dist._at_exit()
    assert list(read_run(tmp_path / "run").steps) == list(range(7))
    assert events(tmp_path / "run") == []  # exchanged: every rank was at its end
    assert watch._dist._at_exit is None and dist.destroy_process_group is original


def test_a_short_run_is_diagnosed_as_the_group_goes_and_findings_says_what_it_cannot_read(group, tmp_path, capsys):
    """A tester's DDP run of 48 steps (flush every 50): watch.findings() returned [] on rank 0 with
    no word why, and nothing was said at destroy_process_group, though the store then held 4 errors."""
    said = []
    watch = train(7, tmp_path / "run", on_finding=said.append)
    assert watch.findings() == []  # nothing stored together yet: one rank's call cannot flush
    assert "findings() reads the steps the ranks stored together (none yet); the 7 since" in capsys.readouterr().err
    watch._live.close = lambda real=watch._live.close: (said.append("closed"), real())[1]
    dist.destroy_process_group()
    assert list(read_run(tmp_path / "run").steps) == list(range(7)) and said == ["closed"]


def test_destroy_imported_by_name_flushes_before_the_group_goes(group, tmp_path):
    """torch's DDP tutorial: `from torch.distributed import destroy_process_group` binds the
    function before gradwatch wraps `dist.destroy_process_group`, so the last window was lost."""
    original = dist.destroy_process_group
    script = types.ModuleType("user_script")
    script.destroy_process_group = original
    sys.modules["user_script"] = script
    try:
        watch = train(5, tmp_path / "run")
        assert script.destroy_process_group is not original
        script.destroy_process_group()
        assert not dist.is_initialized()
        assert list(read_run(tmp_path / "run").steps) == list(range(5))
        assert script.destroy_process_group is original and dist.destroy_process_group is original
        assert watch._dist._at_exit is None  # nothing left to do at exit
    finally:
        del sys.modules["user_script"]


def test_a_rank_ending_on_an_error_makes_no_exchange(group, tmp_path):
    """`finally: destroy_process_group()` on a rank whose training raised: the other ranks wait in
    the training's next collective, so the last window is kept as measured, at once, and said."""
    watch = train(3, tmp_path / "run")
    watch._dist.world = 2  # another rank that never comes: an agreement would wait DESTROY_WAIT
    started = time.monotonic()
    with pytest.raises(ValueError):
        try:
            raise ValueError("corrupt shard\nsecond line")
        finally:
            dist.destroy_process_group()
    assert time.monotonic() - started < 5
    assert list(read_run(tmp_path / "run").steps) == [0, 1, 2]
    assert events(tmp_path / "run") == [("distributed_error", "rank 0: it ended on ValueError: corrupt shard")]


def agree(world: int, wait: float, results: list, arrive_after: float = 0.0) -> None:
    time.sleep(arrive_after)
    d = distributed.Distributed.__new__(distributed.Distributed)
    d.group, d.world = None, world
    results.append(d._all_at_end(wait))


def test_ranks_agree_to_exchange_only_when_all_reach_their_end(group, monkeypatch):
    """sys.exit(1) on one rank mid-training: at exit it cannot tell that from a normal end. It
    waited in the exit exchange while the others waited in DDP's next all-reduce: the run hung for
    the group's timeout (30 minutes), where unwatched it failed in seconds."""
    both: list[bool] = []
    monkeypatch.setattr(distributed, "_ENDS", itertools.repeat(1000))  # one end, seen by two "ranks"
    threads = [threading.Thread(target=agree, args=(2, 5.0, both, delay)) for delay in (0.0, 0.3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert both == [True, True]

    alone: list[bool] = []
    monkeypatch.setattr(distributed, "_ENDS", itertools.repeat(1001))
    started = time.monotonic()
    agree(2, 0.3, alone)  # the other rank is still training
    assert alone == [False] and time.monotonic() - started < 2
    agree(2, 5.0, alone)  # it comes later (its collective failed): it must not exchange either
    assert alone == [False, False]
