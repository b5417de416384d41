"""Watching under torchrun (gloo, 2 CPU processes): statistics equal one process on the global batch.

Each scenario is one torchrun launch of tests/dist_scripts/train.py (a launch costs seconds:
scenarios that can share one do).
"""

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradwatch.store import read_run

SCRIPT = Path(__file__).parent / "dist_scripts" / "train.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
COMPARED = ("grad_norm", "grad_max", "weight_norm", "update_ratio")

spec = importlib.util.spec_from_file_location("dist_train", SCRIPT)
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def torchrun(*args, prefix=(), timeout=90):
    return subprocess.run([*prefix, *TORCHRUN, str(SCRIPT), *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def errors(result) -> str:
    """The workers' stderr without torchrun's warnings."""
    return "\n".join(l for l in result.stderr.splitlines() if not l.startswith("W"))[-4000:]


def launched(tmp_path_factory, scenario: str) -> Path:
    out = tmp_path_factory.mktemp(scenario)
    result = torchrun(scenario, out)
    assert result.returncode == 0, errors(result)
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return launched(tmp_path_factory, "ddp")


@pytest.fixture(scope="module")
def reference():
    """One process training on the global batch: the series DDP and FSDP must reproduce."""
    import gradwatch

    model = train.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with gradwatch.watch(model, opt, flush_every=train.FLUSH_EVERY, sample_every=3, warn=False) as watch:
        for step in range(train.STEPS):
            x, y = train.batch(step)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return watch.series()


def assert_same_series(series, reference):
    assert series.layer_names() == reference.layer_names()
    assert list(series.steps) == list(reference.steps)
    np.testing.assert_allclose(series.loss, reference.loss, rtol=1e-5)
    for metric in COMPARED:
        np.testing.assert_allclose(series.metrics[metric], reference.metrics[metric], rtol=1e-4, atol=1e-7,
                                   err_msg=metric)
    assert np.isfinite(series.metrics["grad_norm"][:, 0]).all()
    assert np.isfinite(series.metrics["update_ratio"]).any()  # sampled steps were compared too


def test_ddp_statistics_equal_one_process_on_the_global_batch(ddp, reference):
    assert sorted(p.name for p in (ddp / "watched").iterdir() if p.suffix == ".sqlite") == ["gradwatch.sqlite"]
    series = read_run(ddp / "watched")
    assert_same_series(series, reference)
    assert series.meta["distributed"] == {"kind": "ddp", "rank": 0, "world_size": 2, "all_ranks": False,
                                       "local_world_size": 2}  # (torchrun's LOCAL_WORLD_SIZE: the fix command's)


def test_ddp_watching_changes_nothing(ddp):
    for rank in (0, 1):
        saved = torch.load(ddp / f"identity-rank{rank}.pt")
        watched, plain = saved["losses"]
        assert all(torch.equal(a, b) for a, b in zip(watched, plain))
        for name, value in saved["weights"][0].items():
            assert torch.equal(value, saved["weights"][1][name]), name


def test_ddp_collectives_only_at_flushes(ddp):
    """12 steps, flush_every=5: flushes at steps 5 and 10 and at detach, one all_gather each."""
    for rank in (0, 1):
        counts = json.loads((ddp / f"collectives-rank{rank}.json").read_text())
        assert counts["watched"] - counts["plain"] == counts["by_gradwatch"] == 3


def test_nan_on_one_rank_is_reported_with_rank_and_step(ddp):
    db = sqlite3.connect(ddp / "nan" / "gradwatch.sqlite")
    events = db.execute("SELECT step, kind, detail FROM events WHERE kind='rank_non_finite'").fetchall()
    assert events == [(train.NAN_STEP, "rank_non_finite", "rank 1: loss nan")]
    series = read_run(ddp / "nan")
    row = list(series.steps).index(train.NAN_STEP)
    assert np.isinf(series.loss[row]) and np.isfinite(series.loss[row - 1])  # the mean over ranks
    params = [series.column(name) for name in series.layer_names("param")]
    assert np.isinf(series.metrics["grad_norm"][row, params]).all()  # synchronised: all ranks' gradient
    from gradwatch.diagnose import diagnose
    said = [f.message for f in diagnose(series) if f.kind == "non_finite"]
    assert any("rank 1: loss nan" in m and f"step {train.NAN_STEP}" in m for m in said)


def test_stop_on_non_finite_stops_every_rank_at_that_step(ddp):
    """Run with all_ranks=True: each rank wrote its own store, with the same statistics."""
    assert sorted(p.name for p in (ddp / "stop").glob("*.sqlite")) == ["gradwatch-rank0.sqlite", "gradwatch-rank1.sqlite"]
    series = [read_run(ddp / "stop" / f"gradwatch-rank{rank}.sqlite") for rank in (0, 1)]
    for rank in (0, 1):
        assert f"stopped at step {train.NAN_STEP}" in (ddp / f"stopped-rank{rank}.txt").read_text()
        assert series[rank].steps.max() == train.NAN_STEP
        assert series[rank].meta["distributed"]["rank"] == rank
    np.testing.assert_array_equal(series[0].metrics["grad_norm"], series[1].metrics["grad_norm"])


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return launched(tmp_path_factory, "fsdp")


@pytest.mark.parametrize("kind", ["fsdp", "fsdp2"])
def test_fsdp_norms_equal_unsharded(fsdp, reference, kind):
    series = read_run(fsdp / kind)
    assert_same_series(series, reference)
    assert series.meta["distributed"]["kind"] == kind
    assert [l.type for l in series.layers] == [l.type for l in reference.layers]  # not FSDPLinear


@pytest.mark.parametrize("name", train.CLIPPERS)
def test_fsdp_clipping_equals_unsharded(fsdp, name):
    model = train.make_model()
    ref_norms = train.train_clipped(model, train.make_clipper(name))
    unclipped = train.make_model()
    train.train(unclipped, torch.optim.SGD(unclipped.parameters(), lr=0.1), train.CLIP_STEPS, None)
    assert any(not torch.allclose(a, b) for a, b in zip(model.parameters(), unclipped.parameters()))  # it clips
    clipped = torch.load(fsdp / "clip.pt")
    for kind in ("fsdp", "fsdp2"):
        norms, weights = clipped[kind, name]
        np.testing.assert_allclose(norms, ref_norms, rtol=1e-5, err_msg=kind)
        for a, b in zip(weights, model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6, msg=kind)


def test_killed_worker_leaves_rank0_store_readable(tmp_path):
    result = torchrun("kill", tmp_path)
    assert result.returncode != 0
    series = read_run(tmp_path)
    # the flush both ranks exchanged just before rank 1 died may be cut on rank 0 by the launcher's
    # SIGTERM (torchrun ends the other workers when one dies; a plain gw.watch leaves SIGTERM as it
    # is): the one before it is on disk (seen under load: 20 of 25)
    flushed = train.KILL_STEP // train.FLUSH_EVERY * train.FLUSH_EVERY
    assert len(series.steps) >= flushed - train.FLUSH_EVERY
    assert list(series.steps) == list(range(len(series.steps)))
    assert np.isfinite(series.metrics["grad_norm"][:, 0]).all()


def test_zero_code_a_rank_that_raises_ends_the_run_with_its_steps_stored(tmp_path):
    """Rank 1 raised while rank 0 waited in DDP's all-reduce: rank 1's exit flush then waited in a
    gradwatch collective of its own, and the run hung for the group's timeout (30 minutes) where,
    unwatched, it failed in seconds; nothing was stored. Now the exit flush makes no collective."""
    run = tmp_path / "run"
    result = torchrun("raise", tmp_path, prefix=[sys.executable, "-m", "gradwatch", "run", "--out", run,
                                                 "--flush-every", str(train.FLUSH_EVERY), "--"], timeout=120)
    assert result.returncode != 0 and "rank 1 fails" in result.stderr
    assert "the distributed run broke at step" in result.stderr  # said in the summary, not only stored
    series = read_run(run)
    assert len(series.steps) >= train.KILL_STEP // train.FLUSH_EVERY * train.FLUSH_EVERY


def test_zero_code_torchrun_attaches_in_every_worker(tmp_path, reference):
    run = tmp_path / "run"
    result = torchrun("plain", tmp_path, prefix=[sys.executable, "-m", "gradwatch", "run", "--out", run,
                                                 "--flush-every", "5", "--sample-every", "3", "--"])
    assert result.returncode == 0, errors(result)
    assert sorted(p.name for p in run.glob("*.sqlite")) == ["gradwatch-rank0.sqlite"]
    series = read_run(run)
    assert series.meta["distributed"]["world_size"] == 2
    assert series.layer_names("param") == reference.layer_names("param")
    np.testing.assert_allclose(series.metrics["grad_norm"], reference.metrics["grad_norm"][:, :], rtol=1e-4)


def test_watching_the_module_inside_ddp_reads_the_averaged_gradients(tmp_path):
    """Before, `gw.watch(net, opt)` with `DistributedDataParallel(net)` training it was a plain
    watch: hooks read each layer of over 4096 entries before DDP's all-reduce (2 ranks, a 10x2048
    layer: 0.284 recorded against the applied 0.199) and every rank wrote the same store. Now the
    DDP around the module is found and the module is watched as the DDP would be (world size 1
    here, in-process: the numbers agree either way, the kind of watch says which it is)."""
    import torch.distributed as dist

    import gradwatch
    from gradwatch.collect import distributed

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        net = torch.nn.Sequential(torch.nn.Linear(10, 512), torch.nn.ReLU(), torch.nn.Linear(512, 2))
        inner = torch.nn.Sequential(torch.nn.Linear(2, 2))
        outer = torch.nn.ModuleDict({"net": net, "head": inner})
        assert distributed.unwrap(net)[1] is None  # no DDP yet
        model = torch.nn.parallel.DistributedDataParallel(outer)
        assert distributed.unwrap(inner)[1:3] == ("ddp", model.process_group)  # a piece of the DDP's module
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with gradwatch.watch(net, opt, out=tmp_path / "run", warn=False):
            loss = model.module["net"](torch.randn(4, 10)).square().mean()
            loss.backward()
            grad = torch.linalg.vector_norm(torch.cat([net[0].weight.grad.flatten(), net[0].bias.grad]))
            opt.step()
        series = read_run(tmp_path / "run")
        assert series.meta["distributed"]["kind"] == "ddp"
        assert series.metrics["grad_norm"][0, 0] == pytest.approx(float(grad), rel=1e-6)
    finally:
        dist.destroy_process_group()


def test_a_rank_error_in_the_summary_is_its_first_line_cut_at_a_word():
    """gloo's errors run to hundreds of characters: cut at 200 they ended mid-word ('... Ch')."""
    from gradwatch.collect.auto import _first_line

    error = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                         + "[127.0.0.1]:29500 " * 20 + "\nsecond line")
    said = _first_line(error)
    assert said.startswith("[../third_party/gloo") and said.endswith("[127.0.0.1]:29500 ...")
    assert len(said) <= 160 and "second" not in said
    assert _first_line(ValueError("")) == ""


def test_under_ddp_the_store_holds_the_averaged_gradients(tmp_path):
    """Before, the callback watched the bare model the Trainer hands it: each rank wrote
    OUT/rank<R> with its local gradients, before DDP's all-reduce (0.161 against 0.111 applied
    for transformer.h.0.mlp.c_fc). Now the DDP wrapper is watched: one store, averaged gradients."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    script = Path(__file__).parent / "dist_scripts" / "hf_ddp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, errors(done)
    assert not (tmp_path / "gradwatch" / "rank0").exists()
    run = read_run(tmp_path / "gradwatch")
    applied = json.loads((tmp_path / "applied.json").read_text())
    assert list(run.steps) == list(range(6)) and len(applied["norms"]) == 6
    assert run.meta["distributed"]["world_size"] == 2
    for name in applied["norms"][0]:
        _, ours = run.series(name, "grad_norm")
        np.testing.assert_allclose(ours, [step[name] for step in applied["norms"]], rtol=1e-5)
    logged = {h["step"]: h["loss"] for h in applied["log"] if "loss" in h}  # the mean over ranks, as ours
    np.testing.assert_allclose([logged[s + 1] for s in range(6)], run.loss, rtol=1e-4)
