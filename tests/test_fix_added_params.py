"""The parameters a remedy adds (BatchNorm's, a GRU's) go to the optimizer, and the group, that holds
the layer they go with, and to none when no optimizer holds it: where the printed change, made
before the optimizers are built, puts them. Before, all went to the first optimizer that stepped
and held any of the model's parameters: a head-only optimizer trained a frozen body's norms (final
loss 0.6919 against the pasted change's 0.7146), a head's lr 0.1 drove a body's norms at 1e-3."""

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose.advice import Context
from gradwatch.fix.candidates import gru, norm
from gradwatch.fix.names import read_names
from gradwatch.fix.trial import run_trial_in_process
from gradwatch.store.series import LayerInfo, RunSeries


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _held(opt: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in opt.param_groups for p in g["params"]}


def _train(make_opts, seen: dict, pasted: bool = False, steps: int = 12) -> None:
    """A 3-class MLP; `make_opts(model)` builds the optimizers, stepped in the order it returns them."""
    torch.manual_seed(0)
    model = Net()
    if pasted:  # the printed change, before the optimizers are built
        model, _ = gw.modify.insert_norm(model, "batch")
    opts = make_opts(model)
    x = torch.randn(64, 8)
    y = x[:, :3].argmax(1)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    seen.update(model=model, opts=opts, losses=losses)


def _trial_and_pasted(tmp_path, make_opts) -> tuple[dict, dict]:
    trial, pasted = {}, {}
    run_trial_in_process(lambda: _train(make_opts, trial), tmp_path / "t", norm("batch"), 100)
    _train(make_opts, pasted, pasted=True)
    return trial, pasted


def _same_training(trial: dict, pasted: dict) -> None:
    assert trial["losses"] == pasted["losses"]
    a, b = dict(trial["model"].named_parameters()), dict(pasted["model"].named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _norms(model: nn.Module) -> list[nn.BatchNorm1d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]


def test_a_body_no_optimizer_holds_keeps_its_norms_untrained_as_the_pasted_change_does(tmp_path):
    trial, pasted = _trial_and_pasted(tmp_path, lambda m: [torch.optim.SGD(m.head.parameters(), lr=0.1)])
    bn = _norms(trial["model"])
    assert len(bn) == 2 and not {id(p) for b in bn for p in b.parameters()} & _held(trial["opts"][0])
    _same_training(trial, pasted)


def test_each_norm_goes_to_the_optimizer_of_the_layer_it_follows(tmp_path):
    """The head's optimizer steps first, at 50 times the body's lr: the body's norms belong to the body's."""
    def opts(m):
        return [torch.optim.SGD(m.head.parameters(), lr=0.1), torch.optim.SGD(m.body.parameters(), lr=2e-3)]

    trial, pasted = _trial_and_pasted(tmp_path, opts)
    head, body = trial["opts"]
    norm_ids = {id(p) for b in _norms(trial["model"]) for p in b.parameters()}
    assert len(norm_ids) == 4 and norm_ids <= _held(body) and not norm_ids & _held(head)
    _same_training(trial, pasted)


def test_a_norm_joins_the_group_of_its_layer(tmp_path):
    """One optimizer, a group per layer with its own lr: each norm in its layer's group."""
    def opts(m):
        return [torch.optim.SGD([{"params": m.body[0].parameters(), "lr": 0.3},
                                 {"params": m.body[2].parameters(), "lr": 0.01},
                                 {"params": m.head.parameters(), "lr": 0.1}], lr=0.1)]

    trial, _ = _trial_and_pasted(tmp_path, opts)
    groups = trial["opts"][0].param_groups
    first, second = _norms(trial["model"])
    assert {id(p) for p in first.parameters()} <= {id(p) for p in groups[0]["params"]}
    assert {id(p) for p in second.parameters()} <= {id(p) for p in groups[1]["params"]}


class Wrapped(nn.Module):
    """Layers held as attributes: insert_norm pairs each with its norm (`Normalised`)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_a_norm_paired_with_its_layer_goes_to_that_layers_optimizer(tmp_path):
    seen: dict = {}

    def train():
        model = Wrapped()
        frozen = torch.optim.SGD(model.fc1.parameters(), lr=0.0)
        rest = torch.optim.SGD([*model.fc2.parameters(), *model.out.parameters()], lr=0.1)
        x = torch.randn(32, 8)
        for _ in range(3):
            loss = model(x).square().mean()
            frozen.zero_grad(); rest.zero_grad(); loss.backward(); frozen.step(); rest.step()
        seen.update(model=model, frozen=frozen, rest=rest)

    run_trial_in_process(train, tmp_path / "w", norm("batch"), 100)
    m = seen["model"]
    assert isinstance(m.fc1, gw.modify.Normalised) and isinstance(m.fc1[1], nn.BatchNorm1d)
    assert {id(p) for p in m.fc1[1].parameters()} <= _held(seen["frozen"])
    assert {id(p) for p in m.fc2[1].parameters()} <= _held(seen["rest"])
    assert not {id(p) for p in m.fc1[1].parameters()} & _held(seen["rest"])


def test_a_gru_goes_to_the_optimizer_of_the_rnn_it_replaced(tmp_path):
    seen: dict = {}

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.rnn, self.head = nn.Linear(3, 8), nn.RNN(8, 8, batch_first=True), nn.Linear(8, 1)

        def forward(self, x):
            return self.head(self.rnn(self.embed(x))[0][:, -1])

    def train():
        model = Seq()
        first = torch.optim.SGD([*model.embed.parameters(), *model.head.parameters()], lr=0.1)
        recurrent = torch.optim.SGD(model.rnn.parameters(), lr=0.01)
        x = torch.randn(4, 5, 3)
        for _ in range(3):
            loss = model(x).square().mean()
            first.zero_grad(); recurrent.zero_grad(); loss.backward(); first.step(); recurrent.step()
        seen.update(model=model, first=first, recurrent=recurrent)

    run_trial_in_process(train, tmp_path / "g", gru(), 100)
    new = {id(p) for p in seen["model"].rnn.parameters()}
    assert isinstance(seen["model"].rnn, nn.GRU)
    assert new <= _held(seen["recurrent"]) and not new & _held(seen["first"])


SCRIPT = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


torch.manual_seed(0)
model = Net()
# CHANGE
OPTIMIZERS
x = torch.randn(64, 8)
y = x[:, :3].argmax(1)
losses = []
for _ in range(12):
    loss = nn.functional.cross_entropy(model(x), y)
    for o in opts:
        o.zero_grad()
    loss.backward()
    for o in opts:
        o.step()
    losses.append(loss.item())
'''


@pytest.mark.parametrize("optimizers", [
    "opt = torch.optim.SGD(model.head.parameters(), lr=0.1)\nopts = [opt]",
    "opt_head = torch.optim.SGD(model.head.parameters(), lr=0.1)\n"
    "opt_body = torch.optim.SGD(model.body.parameters(), lr=2e-3)\nopts = [opt_head, opt_body]",
])
def test_the_printed_norm_change_names_the_module_the_trial_changed_and_trains_alike(tmp_path, optimizers):
    """The optimizers train parts of the module the loop calls: the trial changes that module
    (`model`), so the code must too; `model.head` (what `opt` trains) has no layer to normalise."""
    script = SCRIPT.replace("OPTIMIZERS", optimizers)
    layers = [LayerInfo(n, "Linear", i, "param", 10) for i, n in enumerate(["body.0", "body.2", "head"])]
    run = Context(RunSeries(layers, np.arange(3), np.ones(3), np.full(3, 0.1), {}, meta={"optimizer": "SGD"}))
    names = read_names(script, run)
    code = norm("batch", names).code
    assert code.startswith("model, _ = gw.modify.insert_norm(model, 'batch', example_input=batch)")
    trial: dict = {}
    run_trial_in_process(lambda: exec(script, trial), tmp_path / "t", norm("batch"), 100)
    pasted: dict = {"gw": gw}
    exec(script.replace("# CHANGE", code.replace("example_input=batch", "example_input=torch.zeros(2, 8)")), pasted)
    assert trial["losses"] == pasted["losses"]
    for (n, a), (_, b) in zip(trial["model"].named_parameters(), pasted["model"].named_parameters()):
        assert torch.equal(a, b), n


def _closure_training(spec: dict, model: nn.Module, make, change=None, steps: int = 4,
                      shape: tuple = (16, 4)) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A `step(closure)` loop (LBFGS, Lightning): the first forward, where a trial changes the model,
    runs inside the first step, after the optimizer was first seen. `change(model, opt)`: the
    printed change, pasted after the optimizer is built."""
    from gradwatch.fix.inject import Injector

    injector = Injector(spec, max_steps=None)
    injector.install_late()
    try:
        opt = make(model.parameters())
        if change is not None:
            model = change(model, opt)
        for i in range(steps):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(i))

            def closure():
                opt.zero_grad()
                loss = (model(x) - x.flatten(1).sum(1, keepdim=True)).pow(2).mean()
                loss.backward()
                return loss
            opt.step(closure)
    finally:
        injector.remove()
    return model, opt


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("make", [lambda params: torch.optim.SGD(params, lr=0.1),
                                  lambda params: torch.optim.LBFGS(params, lr=0.1, max_iter=3)], ids=["SGD", "LBFGS"])
def test_a_closure_steps_first_norms_join_the_optimizer_as_pasted(make):
    """LBFGS: its flat history is started anew in the dict its step holds (a new dict started it over
    at every step)."""
    trial, trial_opt = _closure_training(norm("batch").spec, _mlp(), make)
    pasted, _ = _closure_training({}, _mlp(), make, lambda m, opt: gw.modify.insert_norm(m, "batch", optimizer=opt)[0])
    assert id(trial[1].weight) in _held(trial_opt) and not torch.equal(trial[1].weight, torch.ones(8))
    _same_parameters(trial, pasted)


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 6, batch_first=True)  # (first: LBFGS keeps its state under the first parameter)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_an_rnn_replaced_inside_an_lbfgs_step_leaves_it_as_the_pasted_change_does():
    """The trial's GRU comes at the first forward, inside LBFGS's first step(closure): the RNN's
    parameters leave its flat vector, and its state moves to the new first parameter (kept, they
    changed its sums; its state dropped, its history restarted at every step)."""
    lbfgs = lambda params: torch.optim.LBFGS(params, lr=0.5, max_iter=3)
    recurrent = lambda: (torch.manual_seed(0), _Recurrent())[1]
    trial, _ = _closure_training(gru().spec, recurrent(), lbfgs, shape=(8, 5, 3))
    pasted, _ = _closure_training({}, recurrent(), lbfgs, lambda m, opt: gw.modify.replace_rnn(m, optimizer=opt)[0],
                                  shape=(8, 5, 3))
    assert isinstance(trial.rnn, nn.GRU)
    _same_parameters(trial, pasted)


def test_a_swap_that_only_removes_parameters_leaves_the_optimizer_as_the_printed_swap_does():
    """PReLU -> LeakyReLU takes the slopes out of the model; the printed swap passes no optimizer=,
    so the optimizer keeps them, and the trial's kept them too (dropped, LBFGS's flat vector summed
    in another order: the last bits differed)."""
    from gradwatch.fix.candidates import swap

    lbfgs = lambda params: torch.optim.LBFGS(params, lr=0.5, max_iter=3)
    prelu = lambda: (torch.manual_seed(0), nn.Sequential(nn.Linear(4, 8), nn.PReLU(), nn.Linear(8, 1)))[1]
    trial, _ = _closure_training(swap("PReLU", "LeakyReLU").spec, prelu(), lbfgs, steps=3, shape=(8, 4))
    pasted, _ = _closure_training({}, prelu(), lbfgs, lambda m, opt: gw.modify.swap_activations(
        m, nn.PReLU, lambda: nn.LeakyReLU(0.01))[0], steps=3, shape=(8, 4))
    assert len(list(trial.parameters())) == 4
    _same_parameters(trial, pasted)


class _OutputFirst(nn.Module):
    """The output layer registered before the hidden ones."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(8, 3)
        self.inp, self.hidden = nn.Linear(4, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(torch.relu(self.inp(x)))))


def test_the_norm_trial_leaves_the_output_layer_the_batch_reaches_last():
    """A tester's winning "BatchNorm after each layer" trained with a norm on the logits and none
    after the first layer (registration order): the trial's first batch shows the output layer."""
    from gradwatch.fix.inject import apply_to_model

    model = _OutputFirst()
    assert apply_to_model(model, norm("batch").spec, example_input=torch.randn(5, 4)) == ""
    assert type(model.out) is nn.Linear
    assert all("BatchNorm" in type(getattr(model, n)[1]).__name__ for n in ("inp", "hidden"))
