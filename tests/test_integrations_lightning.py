"""Lightning Trainer + GradwatchCallback: a 20-step training on random data with gradient clipping.
The store holds every step; its per-layer norms equal the norms the module sees in
`on_before_optimizer_step` (before Lightning clips), and the logger gets them under the name that
says so."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import gradwatch as gw  # noqa: E402
from gradwatch.integrations.lightning import GRAD_METRIC, GradwatchCallback  # noqa: E402

CLIP = 0.01


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)
        self.preclip: list[dict[str, float]] = []
        self.postclip: list[float] = []

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def on_before_optimizer_step(self, optimizer):  # Lightning: gradients not clipped yet
        self.preclip.append({name: float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in m.parameters(recurse=False)])))
            for name, m in self.named_modules() if list(m.parameters(recurse=False))})

    def on_train_batch_end(self, outputs, batch, i):
        pass

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.postclip.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters()]))))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_records_preclip_norms(tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(160, 8) * 3, torch.randn(160, 1) * 3)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    net = Net()
    callback = GradwatchCallback(flush_every=6, sample_every=5)
    logger = pl.loggers.CSVLogger(tmp_path, name="logs")
    trainer = pl.Trainer(max_steps=20, accelerator="cpu", logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=CLIP,
                         default_root_dir=tmp_path, callbacks=[callback], log_every_n_steps=1)
    trainer.fit(net, loader)

    run = gw.read_run(tmp_path / "gradwatch")
    assert list(run.steps) == list(range(20))
    assert run.meta["framework"].startswith("lightning")
    assert len(net.preclip) == 20
    for name in ("fc1", "fc2"):
        _, ours = run.series(name, "grad_norm")
        np.testing.assert_allclose(ours, [step[name] for step in net.preclip], rtol=1e-5)
    assert max(net.postclip) <= CLIP * 1.0001 and min(run.metrics["grad_norm"][:, run.column("fc2")]) > 2 * CLIP

    with open(logger.log_dir + "/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = {int(r["step"]): float(r[GRAD_METRIC + "fc1"]) for r in rows if r.get(GRAD_METRIC + "fc1")}
    assert sorted(logged) == list(range(20))
    np.testing.assert_allclose([logged[s] for s in range(20)], [step["fc1"] for step in net.preclip], rtol=1e-5)
    assert isinstance(json.loads((tmp_path / "gradwatch" / "findings.json").read_text()), list)


def test_a_reused_callback_records_and_logs_its_second_training(tmp_path):
    """A callback instance reused for a second fit starts afresh: its own store, every step logged."""
    data = torch.utils.data.TensorDataset(torch.randn(80, 8), torch.randn(80, 1))
    callback = GradwatchCallback(flush_every=4, sample_every=5)
    for fit in ("first", "second"):
        torch.manual_seed(0)
        logger = pl.loggers.CSVLogger(tmp_path, name=fit)
        trainer = pl.Trainer(max_steps=10, accelerator="cpu", logger=logger, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[callback], log_every_n_steps=1)
        trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
        with open(logger.log_dir + "/metrics.csv") as fh:
            logged = {int(r["step"]) for r in csv.DictReader(fh) if r.get(GRAD_METRIC + "fc1")}
        assert sorted(logged) == list(range(10)), fit
        assert list(gw.read_run(tmp_path / "gradwatch").steps) == list(range(10)), fit


def test_bad_arguments_are_clear_errors_when_the_callback_is_made(tmp_path):
    """Before, `out=123` was a TypeError and a bad `every` waited for fit; a run directory under a
    file was a raw NotADirectoryError from inside the first flush."""
    with pytest.raises(gw.ConfigError, match="out=123: expected a directory path"):
        GradwatchCallback(123)
    with pytest.raises(gw.ConfigError, match="flush_every=0"):
        GradwatchCallback(flush_every=0)
    (tmp_path / "afile").write_text("x")
    callback = GradwatchCallback(tmp_path / "afile" / "run")
    model = nn.Linear(2, 1)
    with pytest.raises(gw.ConfigError, match="cannot write to the run directory"):
        callback.recorder.start(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path, "lightning")


def test_a_rank_that_does_not_write_leaves_the_run_directory_alone(tmp_path):
    """Under DDP every rank started the callback on the same directory: rank 1 cleared the store
    rank 0 had begun, and the two ranks' write probes raced (rank 1 died with FileNotFoundError on
    one CI run). Only the writing rank prepares the directory now."""
    (tmp_path / "gradwatch.sqlite").write_text("rank 0's store")
    model = nn.Linear(2, 1)
    callback = GradwatchCallback(tmp_path)
    callback.recorder.start(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path, "lightning", writer=False)
    callback.recorder.watch.detach()
    assert (tmp_path / "gradwatch.sqlite").read_text() == "rank 0's store"
    callback.recorder.start(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path, "lightning")
    callback.recorder.watch.detach()
    assert not (tmp_path / "gradwatch.sqlite").exists() or (tmp_path / "gradwatch.sqlite").read_bytes() != b"rank 0's store"


def test_under_ddp_the_store_holds_the_averaged_gradients(tmp_path):
    """Before, each rank wrote OUT/rank<R> with its local gradients, before DDP's all-reduce
    (relative errors up to 0.9 against the gradients applied). Now the strategy's wrapper is
    watched: one store, the norms of the averaged gradients."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "dist_scripts" / "lightning_ddp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "gradwatch" / "rank0").exists()
    run = gw.read_run(tmp_path / "gradwatch")
    applied = json.loads((tmp_path / "applied.json").read_text())
    assert list(run.steps) == list(range(8)) and len(applied) == 8
    for name in ("fc1", "fc2"):
        _, ours = run.series(name, "grad_norm")
        np.testing.assert_allclose(ours, [step[name] for step in applied], rtol=1e-5)
