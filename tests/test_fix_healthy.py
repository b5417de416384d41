"""A healthy script: fix says there is nothing to fix, with what it checked and the loss that fell,
quickly (the baseline alone), and invents no remedy."""

import torch
from rich.console import Console
from torch import nn

from gradwatch.cli.fix_cmd import print_result
from gradwatch.diagnose.finding import Finding
from gradwatch.fix import BASELINE, FixResult, Trial, fix


def _printed(result: FixResult) -> str:
    console = Console(record=True, width=400)
    print_result(result, console)
    return console.export_text()


def test_a_healthy_script_is_told_there_is_nothing_to_fix(tmp_path):
    def train():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        w = torch.randn(4, 1)
        for _ in range(40):
            x = torch.randn(32, 4)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), x @ w).backward()
            opt.step()

    said: list[str] = []
    result = fix(train, out=tmp_path / "fix", budget_steps=40, progress=said.append)
    assert result.baseline.findings == [] and not result.trials and not result.screened and result.winner is None
    assert said == ["gradwatch fix: baseline trial (40 steps)"]  # the baseline alone
    text = _printed(result)
    base = result.baseline
    assert "Nothing to fix: 40 steps of your script showed no vanishing" in text
    assert f"its loss fell from {base.first_loss:.4g} to {base.final_loss:.4g}" in text and base.final_loss < base.first_loss
    assert "0 full trials" not in text and "the baseline, 40 steps" in text


def test_findings_that_call_for_no_remedy_are_named():
    info = Finding("saturation", "info", 3, ("0",), "m", {})
    base = Trial(BASELINE, None, 0, 1.0, steps=40, final_loss=0.5, first_loss=2.0, findings=[info])
    text = _printed(FixResult(base, [], budget_steps=40))
    assert "Nothing to try: the baseline's findings call for no remedy (saturation (info: no block to training))" in text
    stuck = Trial(BASELINE, None, 0, 1.0, steps=40, final_loss=2.0, first_loss=2.0)  # no finding, no progress
    assert "call for no remedy (loss_did_not_fall)" in _printed(FixResult(stuck, [], budget_steps=40))


def test_a_baseline_that_crashes_is_not_called_healthy(tmp_path):
    """Healthy for its 30 steps, then an error of its own: fix said "Nothing to fix ... No remedy
    was tried", as if the script were fine."""
    def train():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(64, 8)
        y = x[:, :3].argmax(1)
        for step in range(100):
            if step == 30:
                raise IndexError("list index out of range")
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    result = fix(train, out=tmp_path, budget_steps=40, progress=lambda _: None)
    assert result.baseline.failed and result.baseline.steps == 30 and not result.trials and not result.screened
    text = " ".join(_printed(result).split())
    assert "Nothing to fix" not in text and "ranked behind" not in text
    assert "No remedy was tried: your script fails on its own, with exit code 1 after 30 steps" in text
    assert "IndexError: list index out of range" in text and str(tmp_path / "baseline" / "output.log") in text
    assert "Fix that error first" in text


def test_a_failed_scripts_error_is_its_exception_line_not_the_tail_of_a_tensor_it_printed(tmp_path):
    """A tester's Gaussian policy failed with a ValueError whose message holds a tensor: the note
    quoted its last line, '(grad_fn=<ExpBackward0>))'."""
    from gradwatch.cli.fix_cmd import _error
    from gradwatch.fix.trial import OUTPUT_LOG

    (tmp_path / OUTPUT_LOG).write_text(
        "update 280 reward -0.9\nTraceback (most recent call last):\n  File \"gauss.py\", line 40, in <module>\n"
        "ValueError: Expected parameter scale (Tensor of shape (64, 1)) of distribution Normal(loc: torch.Size([64, 1]), "
        "scale: torch.Size([64, 1])) to satisfy the constraint GreaterThan(lower_bound=0.0), but found invalid values:\n"
        "tensor([[0.],\n        [0.]], grad_fn=<ExpBackward0>)\n")
    base = Trial(BASELINE, tmp_path, 0, 1.0, steps=290, final_loss=0.5, first_loss=2.0)
    assert _error(base).startswith("ValueError: Expected parameter scale")
    (tmp_path / OUTPUT_LOG).write_text("Traceback (most recent call last):\nException: bad value\ntensor([[0.]])\n")
    assert _error(base) == "Exception: bad value"  # (a bare Exception too: a reviewer's)


def test_a_winner_that_learnt_little_is_not_said_to_leave_no_harmful_finding_when_it_left_one(tmp_path):
    from gradwatch.fix import Candidate

    base = Trial(BASELINE, None, 0, 1.0, steps=40, final_loss=5.0, first_loss=2.0, final_error=0.01,
                 findings=[Finding("exploding_gradient", "error", 3, ("0",), "m", {})])
    win = Trial(Candidate("learning rate x0.1", {"lr_scale": 0.1}, "lr = 0.1"), None, 0, 1.0, steps=40, final_loss=3.0,
                first_loss=2.0, final_error=0.01)  # its loss rose: harmful, loss_did_not_fall
    text = " ".join(_printed(FixResult(base, [win], budget_steps=40)).split())
    assert "its loss rose 50.0% (2 -> 3): little was learnt" in text and "no harmful finding is left" not in text


def test_a_trial_that_recorded_no_step_says_so_and_where_to_look(tmp_path):
    """A tester's trial whose watch could not start showed 'loss inf at 0' and nothing else."""
    from gradwatch.cli.fix_cmd import _left
    from gradwatch.fix import Candidate

    t = Trial(Candidate("ZClip", {"clip": "zclip"}, ""), tmp_path / "screen-3", 0, 1.0, steps=0)
    assert _left(t) == f"no step recorded: see {tmp_path / 'screen-3' / 'output.log'}"
