"""Lightning Trainer + GradwatchCallback: a 20-step training on random data with gradient clipping.
The store holds every step; its per-layer norms equal the norms the module sees in
`on_before_optimizer_step` (before Lightning clips), and the logger gets them under the name that
says so."""

from __future__ import annotations

import csv
import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.report import render_html

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning not installed")


@pytest.fixture(scope="module")
def lit():
    """Lightning, the callback and the modules trained here (lightning_nets), imported as a test runs."""
    import lightning_nets

    return lightning_nets


def test_lightning_records_preclip_norms(lit, tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(160, 8) * 3, torch.randn(160, 1) * 3)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    net = lit.Net()
    callback = lit.GradwatchCallback(flush_every=6, sample_every=5)
    logger = lit.pl.loggers.CSVLogger(tmp_path, name="logs")
    trainer = lit.pl.Trainer(max_steps=20, accelerator="cpu", logger=logger, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=lit.CLIP,
                             default_root_dir=tmp_path, callbacks=[callback], log_every_n_steps=1)
    trainer.fit(net, loader)

    run = gw.read_run(tmp_path / "gradwatch")
    assert list(run.steps) == list(range(20))
    assert run.meta["framework"].startswith("lightning")
    assert len(net.preclip) == 20
    for name in ("fc1", "fc2"):
        _, ours = run.series(name, "grad_norm")
        np.testing.assert_allclose(ours, [step[name] for step in net.preclip], rtol=1e-5)
    assert max(net.postclip) <= lit.CLIP * 1.0001 and min(run.metrics["grad_norm"][:, run.column("fc2")]) > 2 * lit.CLIP

    with open(logger.log_dir + "/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = {int(r["step"]): float(r[lit.GRAD_METRIC + "fc1"]) for r in rows if r.get(lit.GRAD_METRIC + "fc1")}
    assert sorted(logged) == list(range(20))
    np.testing.assert_allclose([logged[s] for s in range(20)], [step["fc1"] for step in net.preclip], rtol=1e-5)
    assert isinstance(json.loads((tmp_path / "gradwatch" / "findings.json").read_text()), list)
    # the clipping is kept with the run, and the report says the norms it shows are above it
    assert run.meta["grad_clip"] == f"the total norm to {lit.CLIP:g} (gradient_clip_val)"
    assert f"the trainer then clipped the total norm to {lit.CLIP:g}" in render_html(run, findings=[])


def test_a_reused_callback_records_and_logs_its_second_training(lit, tmp_path):
    """A callback instance reused for a second fit starts afresh: its own store, every step logged."""
    data = torch.utils.data.TensorDataset(torch.randn(80, 8), torch.randn(80, 1))
    callback = lit.GradwatchCallback(flush_every=4, sample_every=5)
    for fit in ("first", "second"):
        torch.manual_seed(0)
        logger = lit.pl.loggers.CSVLogger(tmp_path, name=fit)
        trainer = lit.pl.Trainer(max_steps=10, accelerator="cpu", logger=logger, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                                 callbacks=[callback], log_every_n_steps=1)
        trainer.fit(lit.Net(), torch.utils.data.DataLoader(data, batch_size=8))
        with open(logger.log_dir + "/metrics.csv") as fh:
            logged = {int(r["step"]) for r in csv.DictReader(fh) if r.get(lit.GRAD_METRIC + "fc1")}
        assert sorted(logged) == list(range(10)), fit
        assert list(gw.read_run(tmp_path / "gradwatch").steps) == list(range(10)), fit


def test_bad_arguments_are_clear_errors_when_the_callback_is_made(lit, tmp_path):
    """Before, `out=123` was a TypeError and a bad `every` waited for fit; a run directory under a
    file was a raw NotADirectoryError from inside the first flush."""
    with pytest.raises(gw.ConfigError, match="out=123: expected a directory path"):
        lit.GradwatchCallback(123)
    with pytest.raises(gw.ConfigError, match="flush_every=0"):
        lit.GradwatchCallback(flush_every=0)
    (tmp_path / "afile").write_text("x")
    callback = lit.GradwatchCallback(tmp_path / "afile" / "run")
    model = nn.Linear(2, 1)
    with pytest.raises(gw.ConfigError, match="cannot write to the run directory"):
        callback.recorder.start(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path, "lightning")


def test_a_rank_that_does_not_write_leaves_the_run_directory_alone(lit, tmp_path):
    """Under DDP every rank started the callback on the same directory: rank 1 cleared the store
    rank 0 had begun, and the two ranks' write probes raced (rank 1 died with FileNotFoundError on
    one CI run). Only the writing rank prepares the directory now."""
    (tmp_path / "gradwatch.sqlite").write_text("rank 0's store")
    model = nn.Linear(2, 1)
    callback = lit.GradwatchCallback(tmp_path)
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


def test_a_gan_records_the_generator_steps_gradients_and_loss(lit, tmp_path):
    """Before, the discriminator's backward (the generator's weights toggled off, requires_grad
    False) made the watch drop the generator's gradients: G's layers had no grad_norm at all, and
    the loss was the discriminator's last micro-batch (0.377 against the generator's 0.676). A
    backward while the watched optimizer is toggled off is another optimizer's now."""
    torch.manual_seed(0)
    gan = lit.GAN()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(96, 8) + 2), batch_size=8)
    with pytest.warns(UserWarning, match="2 optimizers; watching the first only"):
        trainer = lit.pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                                 callbacks=[lit.GradwatchCallback(flush_every=4, sample_every=2)])
        trainer.fit(gan, loader)
    run = gw.read_run(tmp_path / "gradwatch")
    assert len(run.steps) == len(gan.g_norms) == 6
    for name in ("G.0", "G.2"):
        _, ours = run.series(name, "grad_norm")
        np.testing.assert_allclose(ours, [step[name] for step in gan.g_norms], rtol=1e-5)
    np.testing.assert_allclose(run.loss, gan.g_losses, rtol=1e-5)


def test_accumulated_steps_record_the_mean_micro_batch_loss_also_at_an_epochs_short_last_step(lit, tmp_path):
    """10 batches per epoch, accumulate_grad_batches=4: each epoch ends on a step of 2 micro-batches,
    which Lightning still divides by 4. Before, that step's loss was the sum of what backward saw,
    half the mean here (a quarter with 1 micro-batch: 0.289 against 1.157); now it is the mean."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(80, 8), torch.randn(80, 1))
    net = lit.Accumulating()
    trainer = lit.pl.Trainer(max_epochs=2, accelerator="cpu", accumulate_grad_batches=4, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path, callbacks=[lit.GradwatchCallback(flush_every=4, sample_every=3)])
    trainer.fit(net, torch.utils.data.DataLoader(data, batch_size=8))
    run = gw.read_run(tmp_path / "gradwatch")
    assert trainer.global_step == len(run.steps) == len(net.step_losses) == 6
    np.testing.assert_allclose(run.loss, net.step_losses, rtol=1e-5)
    _, ours = run.series("fc1", "grad_norm")
    np.testing.assert_allclose(ours, [step["fc1"] for step in net.preclip], rtol=1e-5)


def _fit(lit, tmp_path, callback, max_steps, net=None, **fit):
    """A fit of Net on 10 batches an epoch, logging to CSV, checkpointing at each epoch's end."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(80, 8), torch.randn(80, 1))
    trainer = lit.pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=lit.pl.loggers.CSVLogger(tmp_path, name="logs"),
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[callback], log_every_n_steps=1)
    trainer.fit(net or lit.Net(), torch.utils.data.DataLoader(data, batch_size=8), **fit)
    return trainer


def _logged_steps(lit, trainer) -> list[int]:
    with open(trainer.logger.log_dir + "/metrics.csv") as fh:
        return sorted(int(r["step"]) for r in csv.DictReader(fh) if r.get(lit.GRAD_METRIC + "fc1"))


def test_a_second_fit_of_the_same_trainer_continues_the_run(lit, tmp_path):
    """Before, the second fit (global steps 10-19) was recorded as steps 0-9, replacing the first
    fit's store, and the logger got two points at each of steps 0-9. Now it continues the run."""
    callback, net = lit.GradwatchCallback(flush_every=4, sample_every=5), lit.Net()
    trainer = _fit(lit, tmp_path, callback, 10, net)
    first = gw.read_run(tmp_path / "gradwatch")
    trainer.fit_loop.epoch_loop.max_steps = 20
    trainer.fit(net, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(80, 8),
                                                                                torch.randn(80, 1)), batch_size=8))
    run = gw.read_run(tmp_path / "gradwatch")
    assert list(run.steps) == list(range(20))
    np.testing.assert_array_equal(run.series("fc1", "grad_norm")[1][:10], first.series("fc1", "grad_norm")[1])
    _, norms = run.series("fc2", "grad_norm")
    np.testing.assert_allclose(norms[10:], [step["fc2"] for step in net.preclip[10:]], rtol=1e-5)
    assert _logged_steps(lit, trainer) == list(range(20))  # each step once


def test_a_fit_resumed_from_a_checkpoint_continues_the_run(lit, tmp_path):
    """Before, `fit(ckpt_path=...)` at global step 10 recorded steps 0-4 and deleted the first
    fit's store. Now its steps are 10-14, after the first fit's 0-9."""
    _fit(lit, tmp_path, lit.GradwatchCallback(flush_every=4, sample_every=5), 10)
    first = gw.read_run(tmp_path / "gradwatch")
    ckpt = next(tmp_path.rglob("*.ckpt"))
    net = lit.Net()
    _fit(lit, tmp_path, lit.GradwatchCallback(flush_every=4, sample_every=5), 15, net, ckpt_path=ckpt)
    run = gw.read_run(tmp_path / "gradwatch")
    assert list(run.steps) == list(range(15))
    np.testing.assert_array_equal(run.loss[:10], first.loss)
    _, norms = run.series("fc1", "grad_norm")
    np.testing.assert_allclose(norms[10:], [step["fc1"] for step in net.preclip], rtol=1e-5)


def _fit_gan(lit, tmp_path, callback, max_epochs, gan, trainer=None, **fit):
    """A GAN fit of 6 generator steps an epoch (global_step counts both optimizers' steps: 12)."""
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(96, 8) + 2), batch_size=8)
    if trainer is None:
        trainer = lit.pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                                 enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback])
    else:
        trainer.fit_loop.max_epochs = max_epochs
    with pytest.warns(UserWarning, match="2 optimizers"):
        trainer.fit(gan, loader, **fit)
    return trainer


@pytest.mark.parametrize("how", ["second_fit", "checkpoint"])
def test_two_optimizers_continue_at_the_watched_optimizers_step(lit, tmp_path, how):
    """Before, a second fit (or a resume from a checkpoint) of a two-optimizer module started at
    trainer.global_step, which counts both optimizers' steps: the store held steps 0-5 then
    12-17, a gap of 6 steps that never happened. Now the watched steps continue: 0-11."""
    trainer = _fit_gan(lit, tmp_path, lit.GradwatchCallback(flush_every=4), 1, lit.GAN())
    assert trainer.global_step == 12
    first = gw.read_run(tmp_path / "gradwatch")
    assert list(first.steps) == list(range(6))
    gan = lit.GAN()
    if how == "second_fit":
        gan = trainer.lightning_module
        gan.g_norms = []
        _fit_gan(lit, tmp_path, None, 2, gan, trainer)
    else:  # a new callback and trainer: the watched step comes from the checkpoint
        gan.load_state_dict(trainer.lightning_module.state_dict())
        _fit_gan(lit, tmp_path, lit.GradwatchCallback(flush_every=4), 2, gan, ckpt_path=next(tmp_path.rglob("*.ckpt")))
    run = gw.read_run(tmp_path / "gradwatch")
    assert list(run.steps) == list(range(12))
    np.testing.assert_array_equal(run.loss[:6], first.loss)
    _, ours = run.series("G.0", "grad_norm")
    np.testing.assert_allclose(ours[6:], [step["G.0"] for step in gan.g_norms], rtol=1e-5)


def test_every_logger_of_the_trainer_gets_the_norms_and_the_findings(lit, tmp_path):
    """With `logger=[TensorBoardLogger, CSVLogger]` Lightning's own `self.log` goes to both, and the
    callback's metrics went to `trainer.logger`, the first one only: the CSV file had none."""
    torch.manual_seed(0)
    x = torch.randn(80, 8)
    x[45, 0] = float("nan")  # batch 5: a non_finite finding to count
    data = torch.utils.data.TensorDataset(x, torch.randn(80, 1))
    loggers = [lit.pl.loggers.CSVLogger(tmp_path, name="first"), lit.pl.loggers.CSVLogger(tmp_path, name="second")]
    trainer = lit.pl.Trainer(max_steps=10, accelerator="cpu", logger=loggers, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[lit.GradwatchCallback(flush_every=4)], log_every_n_steps=1)
    with pytest.warns(UserWarning, match="non_finite"):
        trainer.fit(lit.Net(), torch.utils.data.DataLoader(data, batch_size=8))
    for logger in loggers:
        with open(logger.log_dir + "/metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert sorted(int(r["step"]) for r in rows if r.get(lit.GRAD_METRIC + "fc1")) == list(range(10)), logger.name
        assert [(int(r["step"]), float(r["gradwatch/findings"])) for r in rows if r.get("gradwatch/findings")] == [(5, 1)]


def test_a_fit_that_raises_leaves_a_run_said_to_be_partial(lit, tmp_path):
    """Lightning calls on_exception: the store kept every step until then, but read as a finished
    run; it now says what the training stopped on."""
    from gradwatch.store import partial_note

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(160, 8), torch.randn(160, 1)),
                                         batch_size=8)
    trainer = lit.pl.Trainer(max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[lit.GradwatchCallback(flush_every=5)])
    with pytest.raises(ValueError, match="bad batch"):
        trainer.fit(lit.FailingNet(), loader)
    run = gw.read_run(tmp_path / "gradwatch")
    assert list(run.steps) == list(range(7))
    assert partial_note(run) == ("the training stopped on an error at step 6 (ValueError: bad batch at step 7); "
                                 "every step until then is stored")


@pytest.mark.parametrize("kwargs, said", [({}, None), ({"gradient_clip_val": 0.5}, "the total norm to 0.5 (gradient_clip_val)"),
                                          ({"gradient_clip_val": 2, "gradient_clip_algorithm": "value"},
                                           "each entry to ±2 (gradient_clip_val)")])
def test_the_trainers_clipping_is_said_as_set(lit, kwargs, said):
    from gradwatch.integrations.lightning import _clipping

    trainer = lit.pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, **kwargs)
    assert _clipping(trainer) == said
