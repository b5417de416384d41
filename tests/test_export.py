"""TensorBoard export, after the run (`gradwatch export`) and live (`TensorBoardSink`): the scalars
read back from the event files equal the store's values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

import gradwatch as gw  # noqa: E402
from gradwatch.cli.main import main as cli  # noqa: E402
from gradwatch.integrations.tensorboard import TensorBoardSink  # noqa: E402


def train(out, steps=30, sink=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    watch = gw.watch(model, opt, out=out, warn=False, flush_every=7, sample_every=5)
    if sink is not None:
        watch.on_flush.append(sink)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    watch.detach()
    return watch


def events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def check_scalars(acc: EventAccumulator, run) -> None:
    for name in ("0", "2", "4"):
        steps, values = run.series(name, "grad_norm")
        got = acc.Scalars(f"grad_norm/{name}")
        assert [e.step for e in got] == list(steps)
        np.testing.assert_allclose([e.value for e in got], values, rtol=1e-6)
    steps, ratio = run.series("2", "update_ratio")
    np.testing.assert_allclose([e.value for e in acc.Scalars("update_ratio/2")], ratio, rtol=1e-6)
    assert [e.step for e in acc.Scalars("update_ratio/2")] == list(steps)
    np.testing.assert_allclose([e.value for e in acc.Scalars("loss")], run.loss, rtol=1e-6)
    assert "saturated/1" in acc.Tags()["scalars"]


def test_export_command(tmp_path, capsys):
    train(tmp_path / "run")
    assert cli(["export", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]) == 0
    said = capsys.readouterr()
    assert "Wrote 30 steps" in said.out
    # each stage on stderr (a long run's export was minutes of silence); no findings.json: diagnosed
    assert said.err.splitlines() == ["gradwatch: writing the steps", "gradwatch: diagnosing 30 steps (no up-to-date findings.json)"]
    acc = events(tmp_path / "tb")
    check_scalars(acc, gw.read_run(tmp_path / "run"))
    texts = acc.Tags()["tensors"]
    assert "gradwatch/text_summary" in texts
    kinds = {f.kind for f in gw.diagnose(tmp_path / "run")}
    assert {t.split("/")[1].split("_", 1)[1] for t in texts if t.startswith("findings/")} == kinds
    assert cli(["export", str(tmp_path / "missing"), "--tensorboard", str(tmp_path / "tb2")]) == 2
    # exported again into the same folder: replaced, not appended (every point was there twice)
    assert cli(["export", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]) == 0
    check_scalars(events(tmp_path / "tb"), gw.read_run(tmp_path / "run"))


def test_live_sink_writes_every_flushed_step(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb")
    train(tmp_path / "run", sink=sink)
    sink.close()
    check_scalars(events(tmp_path / "tb"), gw.read_run(tmp_path / "run"))


def test_live_sink_on_an_in_memory_watch(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb")
    watch = train(None, steps=10, sink=sink)
    sink.close()
    assert len(events(tmp_path / "tb").Scalars("grad_norm/0")) == len(watch.stored_series().steps) == 10


def test_each_step_is_one_event_holding_all_its_scalars(tmp_path):
    """An event per value (`add_scalar`) made a 20,000-step, 300-layer export take 76 µs a value
    (over 16 minutes, 300 MB and unfinished); one event per step takes 14 µs a value and 2.4x
    fewer bytes. TensorBoard reads them the same (the other tests here compare every value)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    train(tmp_path / "run", steps=12)
    assert cli(["export", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]) == 0
    (path,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    scalars = [e for e in LegacyEventFileLoader(str(path)).Load()
               if e.HasField("summary") and any(v.HasField("simple_value") for v in e.summary.value)]
    run = gw.read_run(tmp_path / "run")
    assert [e.step for e in scalars] == list(run.steps)
    tags = {v.tag for v in scalars[0].summary.value}
    assert {"loss", "lr", "grad_norm/0", "grad_norm/4", "update_ratio/2"} <= tags


def test_export_uses_the_runs_up_to_date_findings(tmp_path):
    """Export diagnosed the run again even when the callbacks or `gradwatch run` had written
    findings.json: on a 20,000-step, 300-layer run that is 31 s and 0.86 GB of the export's
    205 s. It now takes the saved findings when they are newer than the store, as the report does."""
    import json

    from gradwatch.diagnose.finding import Finding

    train(tmp_path / "run", steps=10)
    saved = Finding("loss_plateau", "info", 7, (), "a saved finding")
    (tmp_path / "run" / "findings.json").write_text(json.dumps([saved.to_dict()]))
    assert cli(["export", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]) == 0
    texts = [t for t in events(tmp_path / "tb").Tags()["tensors"] if t.startswith("findings/")]
    assert texts == ["findings/0_loss_plateau/text_summary"]


def test_a_watch_that_does_not_print_findings_still_writes_them_to_tensorboard(tmp_path, capsys):
    """`gw.watch(..., warn=False, tensorboard_dir=...)` (and `TensorBoardSink(dir, live=None)`, the
    docs' example) wrote no finding at all: the sink only copied what a LiveDiagnosis had found, and
    a watch that prints nothing has none. It now diagnoses on the same schedule itself, silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = gw.watch(model, opt, out=tmp_path / "run", warn=False, flush_every=5, tensorboard_dir=tmp_path / "tb")
    for step in range(20):
        x = torch.randn(16, 4)
        if step == 8:
            x[0, 0] = float("nan")  # a bad batch: non-finite from step 8 on
        opt.zero_grad()
        nn.functional.mse_loss(model(x), torch.randn(16, 1)).backward()
        opt.step()
    watch.detach()
    texts = [t for t in events(tmp_path / "tb").Tags()["tensors"] if t.startswith("findings/")]
    assert texts == ["findings/0_non_finite/text_summary"]
    assert [f.first_step for f in gw.diagnose(tmp_path / "run") if f.kind == "non_finite"] == [8]
    assert capsys.readouterr().err == ""  # warn=False: nothing printed


def test_a_finding_of_the_last_steps_reaches_tensorboard(tmp_path):
    """The live diagnosis runs at every tenth of the run's growth (here at steps 180 and 200): a
    NaN at step 205 of 210 was flushed, but no diagnosis ran after it, and the event files had no
    finding of it (an export of the same run had it). The sink diagnoses the whole run once more
    when the watch closes it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = gw.watch(model, opt, warn=False, flush_every=10, tensorboard_dir=tmp_path / "tb")
    for step in range(210):
        x = torch.randn(16, 4)
        if step == 205:
            x[0, 0] = float("nan")
        opt.zero_grad()
        nn.functional.mse_loss(model(x), torch.randn(16, 1)).backward()
        opt.step()
    watch.detach()
    texts = [t for t in events(tmp_path / "tb").Tags()["tensors"] if t.startswith("findings/")]
    assert [t for t in texts if "_non_finite/" in t] == [f"findings/{len(texts) - 1}_non_finite/text_summary"]
    assert len(set(texts)) == len(texts)  # numbered on from what the live diagnosis had written


def test_a_sink_closed_by_hand_before_the_watch_detaches_is_left_alone(tmp_path):
    """The docs said "call sink.close() at the end": closed before `watch.detach()`, the watch's
    last flush wrote to the closed writer and detach ended in AttributeError ('NoneType' object has
    no attribute 'add_summary')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.watch(model, opt, warn=False, flush_every=10)
    sink = TensorBoardSink(tmp_path / "tb")
    watch.on_flush.append(sink)
    for _ in range(15):
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)).backward()
        opt.step()
    sink.close()
    watch.detach()
    assert [e.step for e in events(tmp_path / "tb").Scalars("loss")] == list(range(10))  # up to its last flush


def test_the_note_says_the_trainers_clipping_after_the_norms(tmp_path):
    """A callback's run keeps the trainer's clipping (`grad_clip`); the export's note said only that
    the norms are pre-clip, not to what the trainer clipped them."""
    from gradwatch.collect.watch import Watch

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Watch(model, opt, out=tmp_path / "run", warn=False, meta={"grad_clip": "the total norm to 0.5 (max_grad_norm)"}):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    assert cli(["export", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]) == 0
    note = events(tmp_path / "tb").Tensors("gradwatch/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "before** any gradient clipping" in note and "The trainer then clipped the total norm to 0.5" in note


def test_param_groups_at_different_rates_each_get_their_learning_rate(tmp_path):
    """Only the first group's lr was exported: a backbone at lr/100 (and its schedule) was not there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 1e-3}, {"params": model[2].parameters()}], lr=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    used = []
    with gw.watch(model, opt, out=tmp_path / "run", warn=False):
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            used.append([g["lr"] for g in opt.param_groups])
            opt.step()
            schedule.step()
    assert cli(["export", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]) == 0
    acc = events(tmp_path / "tb")
    for i in range(2):
        got = acc.Scalars(f"lr/group{i}")
        assert [e.step for e in got] == list(range(5))
        np.testing.assert_allclose([e.value for e in got], [lrs[i] for lrs in used], rtol=1e-6)
    np.testing.assert_allclose([e.value for e in acc.Scalars("lr")], [lrs[0] for lrs in used], rtol=1e-6)
    train(tmp_path / "one", steps=3)  # one rate: no group tags
    assert cli(["export", str(tmp_path / "one"), "--tensorboard", str(tmp_path / "tb1")]) == 0
    assert not [t for t in events(tmp_path / "tb1").Tags()["scalars"] if t.startswith("lr/")]
