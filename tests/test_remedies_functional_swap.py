"""An activation forward() calls as a function (`torch.sigmoid(self.fc(x))`) has no module to swap:
`swap_functions` makes those calls another function's, and `gradwatch fix` tries that swap where
the watch found such calls (before, it offered no swap at all for them)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gw
from gradwatch.diagnose.finding import Finding
from gradwatch.errors import ConfigError
from gradwatch.fix.candidates import from_findings
from gradwatch.fix.inject import apply_to_model


class Sigmoids(nn.Module):
    """Hidden layers through torch.sigmoid, and the output's own sigmoid (BCE's probabilities)."""

    def __init__(self, inplace_relu: bool = False):
        super().__init__()
        self.fcs = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.out = nn.Linear(8, 1)
        self.inplace_relu = inplace_relu

    def forward(self, x):
        for fc in self.fcs:
            x = F.relu(fc(x), inplace=True) if self.inplace_relu else torch.sigmoid(fc(x))
        return torch.sigmoid(self.out(x))


def _by_hand(model: Sigmoids, x: torch.Tensor) -> torch.Tensor:
    """The forward with each hidden call written as F.leaky_relu(., 0.01): the reference."""
    for fc in model.fcs:
        x = F.leaky_relu(fc(x), 0.01)
    return torch.sigmoid(model.out(x))


@pytest.mark.parametrize("inplace_relu", [False, True])
def test_the_hidden_calls_become_leaky_relu_and_the_output_sigmoid_stays(inplace_relu):
    torch.manual_seed(0)
    model, x = Sigmoids(inplace_relu), torch.randn(16, 8)
    want = _by_hand(model, x)
    _, change = gw.modify.swap_functions(model, "relu" if inplace_relu else "sigmoid", example_input=x)
    assert change.modules == ["fcs.0", "fcs.1", "fcs.2"]
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    model(x).sum().backward()  # the gradient flows through the new function
    torch.testing.assert_close(model.fcs[0].weight.grad, torch.autograd.grad(_by_hand(model, x).sum(),
                                                                                model.fcs[0].weight)[0])


class ProbabilityThenValue(nn.Module):
    """torch.sigmoid on the hidden layers and on a probability head, then a linear value head."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.prob, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.sigmoid(self.fc2(torch.sigmoid(self.fc1(x))))
        return torch.sigmoid(self.prob(h)), self.value(h)


def test_a_heads_own_sigmoid_stays_when_another_head_runs_after_it():
    """By call order only the last layer's sigmoid was the output's: the probability head's became
    a Leaky ReLU, and BCE raised on its values outside [0, 1]."""
    torch.manual_seed(0)
    model, x = ProbabilityThenValue(), torch.randn(16, 8)
    want = F.leaky_relu(model.fc2(F.leaky_relu(model.fc1(x), 0.01)), 0.01)
    _, change = gw.modify.swap_functions(model, "sigmoid", example_input=x)
    assert change.modules == ["fc1", "fc2"]
    prob, value = model(x)
    torch.testing.assert_close(prob, torch.sigmoid(model.prob(want)), rtol=0, atol=0)
    torch.testing.assert_close(value, model.value(want), rtol=0, atol=0)


def test_a_model_without_such_calls_is_left_as_it_was():
    torch.manual_seed(0)
    model, x = Sigmoids(), torch.randn(16, 8)
    before = model(x)
    _, change = gw.modify.swap_functions(model, "tanh", example_input=x)
    assert not change and "nothing changed" in str(change)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_an_unknown_function_is_a_clear_error():
    with pytest.raises(ConfigError, match="'gelu'"):
        gw.modify.swap_functions(Sigmoids(), "gelu", example_input=torch.randn(2, 8))


def _applied_at_first_forward(model: nn.Module, spec: dict, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """As a fix trial applies a remedy: from a pre-hook of the model's first call, which runs on."""
    said = []

    def first(module, args):
        handle.remove()
        said.append(apply_to_model(module, spec, args))
    handle = model.register_forward_pre_hook(first)
    return said, model(x)


def test_fix_applies_the_swap_and_the_init_for_the_new_activation():
    torch.manual_seed(0)
    model, x = Sigmoids(), torch.randn(16, 8)
    before = model.fcs[0].weight.detach().clone()
    said, first = _applied_at_first_forward(model, {"swap_fn": {"from": "sigmoid", "to": "leaky_relu"}, "init": "auto"}, x)
    assert said == [""]
    # the first call too, whose pre-hooks ran before the swap's were added (it ran the sigmoids)
    torch.testing.assert_close(first, _by_hand(model, x), rtol=0, atol=0)
    torch.testing.assert_close(model(x), _by_hand(model, x), rtol=0, atol=0)
    assert not torch.overrides._get_current_function_mode_stack()  # left at the end of each call
    assert not torch.equal(model.fcs[0].weight, before)
    # He for Leaky ReLU(0.01): std = gain / sqrt(fan_in), the traced forward shows the new function
    gain = nn.init.calculate_gain("leaky_relu", 0.01)
    assert model.fcs[0].weight.std().item() == pytest.approx(gain / 8 ** 0.5, rel=0.35)
    said, _ = _applied_at_first_forward(Sigmoids(), {"swap_fn": {"from": "tanh", "to": "leaky_relu"}}, x)
    assert "nothing changed" in said[0]


def test_fix_offers_the_swap_for_called_activations_and_no_module_swap():
    saturated = Finding("saturation", "error", 0, ("fcs.0",), "m", {"activations": ["sigmoid"], "at_init": True})
    names = [c.name for c in from_findings([saturated], set(), functions={"sigmoid"})]
    assert "torch.sigmoid -> LeakyReLU + He init" in names and not any(n.startswith("Sigmoid ->") for n in names)
    dead = Finding("dead_units", "error", 20, ("fc1",), "m", {"dead_fraction": {"fc1": 0.9}})
    made = {c.name: c for c in from_findings([dead], set(), functions={"relu"})}
    assert made["F.relu -> LeakyReLU + He init"].spec == {"swap_fn": {"from": "relu", "to": "leaky_relu"}, "init": "auto"}
    assert "re-initialise per activation" not in made  # the swap re-initialises
    assert not any("swap_fn" in c.spec for c in from_findings([dead], {"relu"}, functions=set()))


def test_a_swapped_model_is_saved_whole_and_loads():
    """The swap's hooks were closures: torch.save(model) at the end of a fix trial raised."""
    import io
    torch.manual_seed(0)
    model, x = Sigmoids(), torch.randn(16, 8)
    gw.modify.swap_functions(model, "sigmoid", example_input=x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded.fcs[0].weight, model.fcs[0].weight, rtol=0, atol=0)
