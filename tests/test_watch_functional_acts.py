"""Activations called as functions in forward() (F.relu(self.fc1(x)), torch.sigmoid): no module
runs them, so their units were not recorded. An MLP with F.relu on the digits, 95% of its units dead after
SGD at lr 0.5, read as nothing dead until every unit was (100 steps later), and was told to raise its
lr tenfold. They are found in the loss's graph and read as the modules' own are."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gw
from gradwatch.diagnose.advice import Context

FUNCTIONS = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
MODULES = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class Functional(nn.Module):
    def __init__(self, act: str):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 1)
        self.act = FUNCTIONS[act]

    def forward(self, x):
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


def _twins(act: str) -> tuple[nn.Module, nn.Module]:
    """The same weights twice: activations called as functions, and as modules."""
    torch.manual_seed(0)
    functional = Functional(act)
    with torch.no_grad():
        functional.fc1.bias[:8] = -50.0  # a quarter of fc1's units dead (relu), saturated (sigmoid, tanh)
        functional.fc2.weight.mul_(8.0)
    modules = nn.Sequential(functional.fc1, MODULES[act](), functional.fc2, MODULES[act](), functional.out)
    return functional, copy.deepcopy(modules)


def _watched(model: nn.Module, steps: int = 4) -> tuple:
    torch.manual_seed(1)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gw.watch(model, opt, sample_every=2, warn=False) as watch:
        for _ in range(steps):
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        run = watch.series()
    return run, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_a_functional_activation_is_recorded_as_its_module_twin_is(act):
    functional, modules = _twins(act)
    f_run, _ = _watched(functional)
    m_run, _ = _watched(modules)
    for f_name, m_name in (("fc1", "1"), ("fc2", "3")):
        layer = f_run.layers[f_run.column(f_name)]
        assert (layer.role, layer.activation) == ("param", act)
        for metric in ("act_mean", "act_std", "saturated", "dead"):
            f_rows, m_rows = f_run.metrics[metric][:, f_run.column(f_name)], m_run.metrics[metric][:, m_run.column(m_name)]
            # every sampled step: the first from the graph, the later ones from the layer's hook
            np.testing.assert_allclose(f_rows, m_rows, rtol=1e-5, atol=1e-7, equal_nan=True, err_msg=metric)
        assert np.isfinite(f_run.metrics["act_mean"][[0, 2], f_run.column(f_name)]).all()
    assert f_run.metrics["dead" if act == "relu" else "saturated"][0, f_run.column("fc1")] >= 0.25


def test_an_activation_module_leaves_its_weight_layer_as_it_was():
    _, modules = _twins("relu")
    run, _ = _watched(modules)
    assert run.layers[run.column("0")].activation == ""
    assert run.layers[run.column("1")].activation == "relu"


def test_watching_a_functional_model_changes_no_weight():
    a, _ = _twins("relu")
    b, _ = _twins("relu")
    _, watched = _watched(a, steps=6)
    torch.manual_seed(1)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    opt = torch.optim.SGD(b.parameters(), lr=0.05)
    for _ in range(6):
        loss = F.mse_loss(b(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(watched, b.parameters()))


class WithScale(nn.Module):
    """A model's own bare parameter (its root is a layer): its output is the model's, which the loss
    takes through a sigmoid of its own (BCE on probabilities), not an activation of a layer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.fc(x) * self.scale


def test_the_loss_own_sigmoid_on_a_model_output_is_no_layer_activation():
    torch.manual_seed(0)
    model = WithScale()
    x, y = torch.randn(32, 4), torch.rand(32, 1).round()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, sample_every=1, warn=False) as watch:
        for _ in range(2):
            loss = F.binary_cross_entropy(torch.sigmoid(model(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        run = watch.series()
    assert {l.name: l.activation for l in run.layers} == {"scale": "", "fc": ""}


def test_dying_functional_relus_are_found_and_the_forward_line_is_the_remedy():
    torch.manual_seed(0)
    model = Functional("relu")
    with torch.no_grad():
        model.fc1.bias[:24] = -50.0  # 75% of fc1's units dead from the start
    x, y = torch.randn(256, 16), torch.randn(256, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(model, opt, warn=False) as watch:
        for step in range(120):
            i = torch.arange(step % 4 * 64, step % 4 * 64 + 64)
            loss = F.mse_loss(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        findings = watch.findings()
    dead = next(f for f in findings if f.kind == "dead_units")
    assert "fc1" in dead.layers and "F.relu('fc1')" in dead.message
    codes = "\n".join(r.code for r in dead.remedies)
    assert "F.leaky_relu(x, 0.01)" in codes and "swap_activations" not in codes


class SigmoidsToBCE(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 1)

    def forward(self, x):
        return torch.sigmoid(self.out(torch.sigmoid(self.fc2(torch.sigmoid(self.fc1(x))))))


def test_the_swap_line_names_the_saturated_hidden_layers_not_the_output_sigmoid():
    """A reviewer's pasted line named `model.out` too: BCELoss then got values outside [0, 1]."""
    torch.manual_seed(0)
    model = SigmoidsToBCE()
    with torch.no_grad():
        for fc in (model.fc1, model.fc2):
            fc.weight.mul_(30.0)  # pinned at 0 or 1 from the start
    x, y = torch.randn(128, 16), torch.rand(128, 1).round()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(model, opt, warn=False) as watch:
        for _ in range(60):
            loss = F.binary_cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        findings, run = watch.findings(), watch.series()
    lines = {f.kind: r.code.splitlines()[0] for f in findings for r in f.remedies if "F.leaky_relu" in r.code}
    assert "saturation" in lines
    for line in lines.values():
        assert "model.fc1" in line and "model.fc2" in line and "model.out" not in line
    # what every swap line is made from (a vanishing gradient's names no layers): the hidden ones
    assert Context(run).functional == {"sigmoid": ["fc1", "fc2"]}
    assert {l.name: l.activation for l in run.layers}["out"] == "sigmoid"


class SharedLayer(nn.Module):
    """One layer called twice: through F.relu, and raw (a reviewer's): no layer followed by F.relu."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(16, 16), nn.Linear(32, 1)

    def forward(self, x):
        return self.out(torch.cat([F.relu(self.fc(x)), self.fc(-3 * x)], 1))


class Conv1dRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv1d(8, 8, 3, padding=1), nn.Linear(8, 1)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).mean(-1))


def test_a_layer_called_twice_once_without_the_function_takes_no_activation():
    torch.manual_seed(0)
    run, _ = _watched_model(SharedLayer(), torch.randn(64, 16))
    assert run.layers[run.column("fc")].activation == ""


def test_a_conv1d_through_f_relu_counts_its_channels_from_the_first_step():
    """The first step's statistics come from the graph's saved output, whose units' axis is read
    from the graph too: detached, a (N, C, L) output fell back to its length (0% dead for 87.5%)."""
    torch.manual_seed(0)
    model = Conv1dRelu()
    with torch.no_grad():
        model.conv.bias[0], model.conv.bias[1:] = 1.0, -100.0  # 7 of 8 channels below 0 everywhere
    run, _ = _watched_model(model, torch.randn(32, 8, 20).abs() * 0.01)
    dead = run.metrics["dead"][:, run.column("conv")]
    assert dead[0] == pytest.approx(7 / 8) and dead[2] == pytest.approx(7 / 8)


def test_only_the_output_s_own_sigmoid_is_no_saturating_activation_to_swap():
    """BCE's probabilities through torch.sigmoid(self.out(h)), ReLU modules inside: the advice's
    context held a saturating sigmoid and advised swapping nn.Sigmoid modules the model has not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    run, _ = _watched_model(model, torch.randn(64, 16), output=torch.sigmoid)
    assert run.layers[run.column("2")].activation == "sigmoid"  # (recorded: the output's own)
    assert Context(run).saturating == [] and Context(run).functional == {}


def _watched_model(model: nn.Module, x: torch.Tensor, output=lambda t: t, steps: int = 4) -> tuple:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights as they were: every sample alike
    with gw.watch(model, opt, sample_every=2, warn=False) as watch:
        for _ in range(steps):
            loss = output(model(x)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return watch.series(), None


def test_a_layer_output_is_told_by_its_own_parameters():
    """What guards a node that took a freed one's id (under load, a thread's teacher run before the
    training lent the model's output node its id, and its statistics went to another layer)."""
    from gradwatch.collect.functional_acts import made_from
    torch.manual_seed(0)
    model = Functional("relu")
    y = model.fc2(F.relu(model.fc1(torch.randn(4, 16))))
    assert made_from(y.grad_fn, list(model.fc2.parameters()))
    assert not made_from(y.grad_fn, list(model.fc1.parameters()))  # (the layer below, through its F.relu)


class _TwoHeads(nn.Module):
    """An objectness head (Linear + Sigmoid module) run before a box head, and a policy head's
    torch.tanh on its Linear, before a value head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh())
        self.obj = nn.Sequential(nn.Linear(32, 1), nn.Sigmoid())
        self.pi = nn.Linear(32, 2)
        self.box = nn.Linear(32, 4)

    def forward(self, x):
        h = self.body(x)
        return self.obj(h).squeeze(-1), torch.tanh(self.pi(h)), self.box(torch.relu(h))


def test_a_heads_activation_another_head_runs_after_is_the_outputs_own():
    """A tester's detector: its objectness sigmoid, confident, read as a hidden layer's saturation
    ("lower the lr tenfold") because the box head ran after it. The loss takes it, and the policy
    head's tanh, through no weight layer: the run says so (`output_layers`), and no hidden
    activation (the trunk's ReLU and Tanh, the ReLU before the box head) is among them."""
    torch.manual_seed(0)
    model = _TwoHeads()
    x = torch.randn(64, 16)
    y, a, b = (x[:, 0] > 0).float(), torch.randn(64, 2), torch.randn(64, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gw.watch(model, opt, sample_every=2, warn=False) as watch:
        for _ in range(6):
            p, pi, box = model(x)
            loss = F.binary_cross_entropy(p, y) + F.mse_loss(pi, a) + F.mse_loss(box, b)
            opt.zero_grad()
            loss.backward()
            opt.step()
        run = watch.series()
    assert sorted(run.meta["output_layers"]) == ["obj.1", "pi"]
    assert run.layers[run.column("pi")].activation == "tanh"  # (found called as a function)
    ctx = Context(run)
    assert ctx.functional == {} and ctx.saturating == ["tanh"] and ctx.n_saturating == 1  # the trunk's Tanh only
