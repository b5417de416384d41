"""Ranks that would part ways (torchrun, gloo, 2 CPU processes): gw.guard under FSDP, where each rank
checks only its shard, skips a step on every rank together; a watched DDP run with uneven inputs under
ddp.join() finishes."""

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradwatch.store import read_run

SCRIPT = Path(__file__).parent / "dist_scripts" / "guard_fsdp.py"
JOIN_SCRIPT = Path(__file__).parent / "dist_scripts" / "ddp_join.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

spec = importlib.util.spec_from_file_location("guard_fsdp", SCRIPT)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def launch(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run torchrun in a session of its own: on a timeout (a hang) its workers are ended with it."""
    with subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def one_process_skipping_the_bad_step() -> list[torch.Tensor]:
    """The same training in one process on the global batch, with the bad step skipped: FSDP averages
    the ranks' gradients of their own sums, so the loss is the global sum over the 2 ranks."""
    model = script.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for step in range(script.STEPS):
        opt.zero_grad()
        (sum(model(script.tokens(r)).sum() for r in range(2)) / 2).backward()
        if step != script.BAD_STEP:
            opt.step()
    return [p.detach() for p in model.parameters()]


def test_an_inf_in_one_ranks_shard_skips_the_step_on_every_rank(tmp_path):
    # Each rank checks only its own shard: deciding alone, rank 0 stepped while rank 1 skipped, a half
    # update with Adam's step counts different across ranks. They agree with one all-reduce now.
    result = launch([*TORCHRUN, str(SCRIPT), str(tmp_path)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"guard-rank{r}.pt") for r in range(2)]
    reference = one_process_skipping_the_bad_step()
    for kind in ("fsdp", "fsdp2"):
        assert [(r[kind]["steps"], r[kind]["skipped"]) for r in ranks] == [(script.STEPS - 1, 1)] * 2, kind
        for got, want in zip(ranks[0][kind]["weights"], reference):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=kind)


def test_uneven_inputs_under_join_finish_and_store_the_applied_gradients(tmp_path):
    # Rank 1 runs out of batches first and waits in the join, which shadows DDP's all-reduces only:
    # the watch's flush exchange (an all_gather every 5 steps) then met no partner and the run hung
    # until torchrun's timeout. Under join nothing is exchanged; DDP's gradients need nothing.
    result = launch([*TORCHRUN, str(JOIN_SCRIPT), str(tmp_path)], timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    applied = np.array(torch.load(tmp_path / "grads.pt"))  # (steps, Linear layers), rank 0's
    series = read_run(tmp_path / "run")
    assert len(series.steps) == len(applied) == 12
    columns = [series.layer_names().index(name) for name in ("0", "2")]
    np.testing.assert_allclose(series.metrics["grad_norm"][:, columns], applied, rtol=1e-5)


def test_a_joined_ddp_does_not_switch_off_the_exchange_of_a_later_one(tmp_path):
    """A module-wide set of watched DDPs: once one had entered join(), every later watch in the process
    took itself for uneven and exchanged nothing (0 collectives, the loss not averaged over ranks)."""
    script = Path(__file__).parent / "dist_scripts" / "ddp_two_watches.py"
    result = launch([sys.executable, str(script), str(tmp_path)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {name: (int(n), uneven == "True") for name, n, uneven in (l.split() for l in result.stdout.splitlines())}
    assert runs["joined"] == (0, True)
    assert runs["plain"][1] is False and runs["plain"][0] > 0, runs
    assert runs["inner"][1] is False and runs["inner"][0] > 0, runs
