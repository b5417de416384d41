"""A torch.compile'd model: a remedy that looks at the first batch (an activation swap, a
per-activation init) changes the module the compiled one wraps, and the trial trains."""

import torch
from torch import nn

from gradwatch.fix.candidates import Candidate
from gradwatch.fix.trial import run_trial_in_process


def test_an_activation_swap_applies_to_a_compiled_model(tmp_path):
    """Every swap trial of a compiled script failed at step 0: the first batch, run through the
    compiled model, had the look's hooks traced by dynamo, which refused them."""
    built = []

    def train():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
        built.append(model)
        compiled = torch.compile(model, backend="eager")  # dynamo alone: what failed, without inductor's cost
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(compiled(x), y).backward()
            opt.step()

    spec = {"swap": {"from": "Sigmoid", "to": "LeakyReLU"}, "init": "auto"}
    trial = run_trial_in_process(train, tmp_path / "t", Candidate("swap", spec), 3)
    assert not trial.failed and trial.steps == 3
    assert isinstance(built[0][1], nn.LeakyReLU)  # the wrapped model was changed, and trained
