"""A fault that begins late (a fine-tuning after a pretraining, an lr raised by hand mid-run): the
screening measures each remedy past the fault's onset, and a new phase's lr is no schedule."""

import numpy as np
import torch
from torch import nn

from gradwatch.diagnose.finding import Finding
from gradwatch.fix import BASELINE, Trial, fix, onset, screen_in_full, screen_steps
from gradwatch.fix.candidates import clip_norm, lr_ceiling, lr_scale
from gradwatch.store.series import RunSeries
from test_fix_full_screen import late_blow_up


def test_screening_is_counted_from_the_first_findings_onset():
    assert screen_steps(150) == 37 and screen_steps(150, 60) == 97 and screen_steps(40, 100) == 40
    late = Finding("exploding_gradient", "error", 65, ("3",), "m", {})
    info = Finding("saturation", "info", 5, ("1",), "m", {})  # no remedy is for it: no onset
    base = Trial(BASELINE, None, 0, 1.0, steps=150, findings=[info, late])
    assert onset(base, np.arange(150)) == 65 and onset(base, np.arange(10, 160)) == 55
    assert onset(Trial(BASELINE, None, 0, 1.0, steps=150), np.arange(150)) == 0


def test_a_late_blow_up_is_screened_past_its_start(tmp_path):
    """Healthy for 20 steps, then the lr raised 100x: screened for 10 steps (a quarter of 40, at
    least 10), every remedy ran healthy steps only and was ranked on noise."""
    result = fix(lambda: late_blow_up(raised_to=1.0), out=tmp_path, budget_steps=40, candidates=[lr_scale(0.1), clip_norm(1.0)],
                 progress=lambda m: None)
    start = onset(result.baseline, np.arange(40))
    assert start >= 20 and screen_steps(40, start) == min(40, 10 + start) > 10
    assert screen_in_full(screen_steps(40, start), 40, 2) and result.screen_steps == 40  # (at most one trial more)
    assert all(t.steps == result.screen_steps for t in result.screened)


def test_the_lr_of_a_new_phase_is_no_schedule_to_cap():
    """Adam at 1e-3 for a pretraining, then SGD at 3.0 for a fine-tuning that blew up: the jump was
    read as a schedule raising the lr, and "learning rate at most 0.001" was tried (and printed)."""
    steps = np.arange(100)
    lr = np.where(steps < 60, 1e-3, 3.0)
    loss = np.where(steps < 60, 1.0 - steps / 100, 2.3 + (steps - 60) * 0.5)
    run = RunSeries([], steps, loss, lr, {}, meta={"phase_starts": [60]})
    blow = [Finding("loss_divergence", "error", 65, (), "m", {})]
    assert lr_ceiling(run, blow) is None
    # the fine-tuning's model shares the pretrained encoder: no new phase, but Adam stopped at 61
    shared = RunSeries([], steps, loss, lr, {}, meta={"optimizer_stopped": [[61, ["dec"]]]})
    assert lr_ceiling(shared, blow) is None
    # a warm-up within one phase that raised the lr until the run blew up is still capped
    warm = RunSeries([], steps, np.where(steps < 50, 2.0 - steps / 50, 1.0 + (steps - 50)), 1e-3 * (1 + steps), {})
    assert lr_ceiling(warm, blow) is not None


def test_whether_the_loss_fell_is_judged_within_the_last_phase(tmp_path):
    """A pretraining (MSE, 0.2) then a fine-tuning on its encoder (cross-entropy, 1.1 falling to 0.5):
    judged against the pretraining's first losses, the fine-tuning "did not fall" (loss_did_not_fall),
    and a repair was called "the best of the trials"."""
    from gradwatch.fix.trial import run_trial_in_process

    def train():
        torch.manual_seed(0)
        x = torch.randn(256, 8)
        y = x[:, :3].argmax(1)
        enc = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        ae = nn.Sequential(enc, nn.Linear(16, 8))
        opt = torch.optim.Adam(ae.parameters(), lr=1e-2)
        for step in range(30):
            opt.zero_grad()
            (0.1 * nn.functional.mse_loss(ae(x[:64]), x[:64])).backward()  # at most 0.1: below the CE
            opt.step()
        clf = nn.Sequential(enc, nn.Linear(16, 3))
        ft = torch.optim.SGD(clf.parameters(), lr=0.5)
        for step in range(40):
            i = torch.arange(step * 32, step * 32 + 32) % 256
            ft.zero_grad()
            nn.functional.cross_entropy(clf(x[i]), y[i]).backward()
            ft.step()

    t = run_trial_in_process(train, tmp_path / "b", BASELINE, 70)
    ce = t.final_loss
    assert t.steps == 70 and np.isfinite(ce) and t.first_loss > ce  # the fine-tuning's own start, above its end
    assert "loss_did_not_fall" not in t.harmful


def test_the_last_phase_starts_where_a_model_or_the_stepping_optimizer_changed():
    from gradwatch.fix.trial import last_phase

    steps = np.arange(150)
    run = lambda meta: RunSeries([], steps, np.ones(150), np.ones(150), {}, meta=meta)  # noqa: E731
    assert last_phase(run({})) == 0
    assert last_phase(run({"optimizer_stopped": [[61, ["dec"]]]})) == 61
    assert last_phase(run({"phase_starts": [40], "optimizer_stopped": [[61, ["dec"]]]})) == 61
    assert last_phase(run({"phase_starts": [145], "optimizer_stopped": [[61, ["dec"]]]})) == 61  # 5 steps: too few
