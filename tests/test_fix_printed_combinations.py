"""The code `fix` prints for a combination of remedies is one block that runs pasted right after the
optimizer is built, and trains what the trial (inject.py's hooks) trained. Before, a norm or GRU
combined with a clipper or an lr change was printed for two places ("before the optimizer is built",
"after"): pasted as one block after the optimizer, the norms were in no optimizer (BatchNorm's
weight stayed 1); and a norm + clip then Adam printed the clip above the Adam, on the discarded SGD."""

import itertools

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.fix import candidates as C
from gradwatch.fix.inject import Injector


class Net(nn.Module):
    """A recurrent layer then a sigmoid MLP head: every model remedy has something to change."""

    def __init__(self, cell: type = nn.RNN):
        super().__init__()
        self.rnn = cell(4, 8, batch_first=True)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


REMEDIES = {"swap": C.swap("Sigmoid", "LeakyReLU", "auto"), "selu": C.swap("*", "SELU", "lecun", ("Sigmoid",)),
            "norm": C.norm("batch"), "layernorm": C.norm("layer"), "init": C.reinit(), "gru": C.gru(),
            "orthogonal": C.orthogonal(), "forget": C.forget_bias(), "adam": C.adam(),
            "adam_const": C.adam(unscheduled=True), "clip": C.clip_norm(0.05), "clip_value": C.clip_value(0.01),
            "zclip": C.zclip(), "lr": C.lr_scale(0.1), "lr_cap": C.lr_cap(0.05), "zero_grad": C.zero_grad()}


def _combined(keys: tuple[str, ...]) -> C.Candidate | None:
    cand = REMEDIES[keys[0]]
    for k in keys[1:]:
        cand = C.combine(cand, REMEDIES[k]) if cand is not None else None
    return cand


# each pair in both orders (the printed order must not depend on it), each triple
COMBOS = [order for n in (2, 3) for keys in itertools.combinations(REMEDIES, n)
          for order in ((keys, keys[::-1]) if n == 2 else (keys,)) if _combined(order) is not None]


def _batches(steps: int) -> list[torch.Tensor]:
    return [torch.randn(16, 5, 4, generator=torch.Generator().manual_seed(i)) for i in range(steps)]


def _train(spec: dict, code: str | None, cell: type = nn.RNN, steps: int = 5) -> tuple[nn.Module, object]:
    """The script: model, SGD, `code` pasted right after it (or `spec` injected as a trial), `steps` steps."""
    torch.manual_seed(0)
    model, batches = Net(cell), _batches(steps)
    injector = Injector(spec, max_steps=None) if spec else None
    if injector:
        injector.install_late()
    try:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        if code:
            scope = {"gw": gw, "torch": torch, "nn": nn, "model": model, "optimizer": opt, "batch": batches[0],
                     "rnn": model.rnn, "lstm": model.rnn}  # (the placeholders the printed code explains)
            exec(code, scope)
            model, opt = scope["model"], scope["optimizer"]
        for x in batches:
            opt.zero_grad()
            (model(x) - x.sum((1, 2)).unsqueeze(1)).pow(2).mean().backward()
            opt.step()
    finally:
        if injector:
            injector.remove()
    return model, opt


def _clipped(opt: torch.optim.Optimizer) -> bool:
    return any(getattr(h, "clipper", None) is not None for h in opt._optimizer_step_pre_hooks.values())


@pytest.mark.parametrize("keys", COMBOS, ids="+".join)
def test_every_combination_runs_pasted_after_the_optimizer_and_steps_every_parameter(keys):
    cand = _combined(keys)
    model, opt = _train({}, cand.code, nn.LSTM if "forget" in keys else nn.RNN, steps=1)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}, cand.code  # every one, and no replaced RNN's
    assert _clipped(opt) == ("clip" in cand.spec), cand.code  # on the optimizer that steps


@pytest.mark.parametrize("keys", [("norm", "lr"), ("norm", "clip"), ("gru", "clip"), ("gru", "lr"),
                                  ("layernorm", "lr_cap"), ("swap", "norm", "clip"), ("norm", "gru", "lr"),
                                  ("norm", "init", "zclip"), ("adam", "norm"), ("gru", "adam")], ids="+".join)
def test_the_pasted_combination_trains_as_the_trial(keys):
    cand = _combined(keys)
    trial, _ = _train(cand.spec, None)
    pasted, _ = _train({}, cand.code)
    untouched, _ = _train({}, None)
    a, b = trial.state_dict(), pasted.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if "norm" in cand.spec:  # the norms trained (their weights left 1), in both
        weights = [v for k, v in a.items() if k.endswith("_bn.weight") or k.endswith("_ln.weight")]
        assert weights and all((w != 1).any() for w in weights)
    assert not all(torch.equal(a[k], v) for k, v in untouched.state_dict().items() if k in a)


def test_three_way_lines_run_model_change_then_optimizer_swap_then_clipper():
    for order in itertools.permutations(("norm", "clip", "adam")):
        code = _combined(order).code
        assert code.index("insert_norm(") < code.index("torch.optim.Adam(") < code.index("gw.clip.attach("), code


def test_a_norm_alone_is_still_made_before_the_optimizer_is_built():
    """Alone, nothing of the change goes after the optimizer: it stays where a model change belongs."""
    assert "optimizer=" not in C.norm("batch").code and "before optimizer is built" in C.norm("batch").code
    assert "optimizer=" not in C.combine(C.norm("batch"), C.adam()).code  # the Adam takes the changed model's


def test_several_optimizers_each_get_the_norms_of_the_layers_they_train():
    """A GAN's two optimizers: the printed change names both, and each gets only its own model's norms."""
    from gradwatch.fix.names import Names

    names = Names(model="disc", optimizer="opt_d", found=frozenset({"model", "optimizer"}),
                  optimizers=(("opt_g", "gen"), ("opt_d", "disc")), aimed=True)
    code = C.combine(C.norm("batch", names), C.clip_norm(1.0, names)).code
    assert "optimizer=[opt_g, opt_d]" in code
    gen, disc = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)), nn.Sequential(
        nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    opt_g, opt_d = torch.optim.SGD(gen.parameters(), lr=0.1), torch.optim.SGD(disc.parameters(), lr=0.1)
    scope = {"gw": gw, "torch": torch, "gen": gen, "disc": disc, "opt_g": opt_g, "opt_d": opt_d, "batch": torch.zeros(2, 2)}
    exec(code, scope)
    norm_ids = {id(p) for m in scope["disc"].modules() if isinstance(m, nn.BatchNorm1d) for p in m.parameters()}
    assert len(norm_ids) == 2
    assert norm_ids <= {id(p) for p in opt_d.param_groups[0]["params"]}
    assert not norm_ids & {id(p) for p in opt_g.param_groups[0]["params"]}
    assert _clipped(opt_g) and _clipped(opt_d)


def test_updates_by_hand_keep_the_change_before_training():
    """No optimizer (p -= lr * p.grad): nothing to give the parameters to; the update reaches them."""
    import numpy as np

    from gradwatch.diagnose.advice import Context
    from gradwatch.fix.names import Names
    from gradwatch.store.series import LayerInfo, RunSeries

    run = Context(RunSeries([LayerInfo("0", "Linear", 0, "param", 4)], np.arange(3), np.ones(3), np.full(3, 0.1), {},
                            meta={"optimizer": None}))
    names = Names(run=run, update_lr="lr")
    code = C.combine(C.norm("batch", names), C.clip_norm(1.0, names)).code
    assert "optimizer" not in code and "before training: new parameters" in code
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    exec(code, {"gw": gw, "torch": torch, "model": model, "batch": torch.zeros(2, 4)})  # (the clip line, every step, runs once here)


RESUMES = """import os, torch, torch.nn as nn
import gradwatch as gw
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
batch = torch.zeros(2, 4)
#BEFORE THE LOAD
if os.path.exists("ckpt.pt"):
    ck = torch.load("ckpt.pt")
    net.load_state_dict(ck["net"])
    opt.load_state_dict(ck["opt"])
#AFTER THE LOAD
for i in range(3):
    x = torch.randn(16, 4)
    opt.zero_grad(); net(x).pow(2).mean().backward(); opt.step()
torch.save({"net": net.state_dict(), "opt": opt.state_dict()}, "ckpt.pt")
"""


def test_a_script_that_resumes_gets_its_new_layers_before_the_load_and_runs_twice(tmp_path, monkeypatch):
    """Made after the load (where an lr change goes), the norms were missing from the model its
    second run loaded a checkpoint holding them into."""
    from gradwatch.fix.names import read_names

    names = read_names(RESUMES)
    code = C.combine(C.norm("batch", names), C.lr_scale(0.1, names)).code.splitlines()
    before = [line for line in code if "before any load_state_dict" in line]
    after = [line for line in code if line not in before]
    assert len(before) == 1 and "insert_norm" in before[0] and "state loaded" in after[0]
    pasted = RESUMES.replace("#BEFORE THE LOAD", before[0]).replace("#AFTER THE LOAD", "\n".join(after))
    monkeypatch.chdir(tmp_path)
    for run in range(2):  # the second loads the first's checkpoint
        exec(compile(pasted, "train.py", "exec"), {})
    assert "0_bn.weight" in torch.load(tmp_path / "ckpt.pt")["net"]


@pytest.mark.parametrize("groups", [
    '[{"params": m.parameters(), "lr": 0.1 / (i + 1)} for i, m in enumerate(model) if isinstance(m, nn.Linear)]',
    '[{"params": layer.parameters()} for layer in model.children()]',
    '[{"params": m.parameters(), "lr": lr} for lr, m in zip([0.1, 0.2, 0.3], model)]',
    '[{"params": l.parameters()} for blk in [model] for l in blk.children()]',
    '[{"params": m.parameters()} for m in [model[0], model[2]]]',
])
def test_an_optimizer_built_from_a_comprehension_over_the_model_names_the_model(groups):
    """Per-layer groups built by a comprehension: its variable (`m`) was read as the model, and the
    printed change (`m, _ = gw.modify.insert_norm(m, ...)`) raised a NameError pasted."""
    from gradwatch.fix.names import read_names

    source = ("import torch\nfrom torch import nn\nmodel = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))\n"
              f"optimizer = torch.optim.SGD({groups}, lr=0.1)\n"
              "for step in range(3):\n    optimizer.zero_grad()\n    model(torch.randn(2, 4)).sum().backward()\n"
              "    optimizer.step()\n")
    names = read_names(source)
    assert names.changed == "model"
    assert C.combine(C.norm("batch", names), C.clip_norm(1.0, names)).code.startswith("model, _ = gw.modify.insert_norm(model")


def test_groups_from_a_module_the_source_cannot_name_fall_back_to_the_model_the_loop_calls():
    """`getattr(net, k).parameters()`: printed as the module's name, it was a SyntaxError pasted."""
    from gradwatch.fix.names import read_names

    source = ("import torch\nfrom torch import nn\nnet = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))\n"
              "lrs = {'0': 0.1, '2': 0.01}\n"
              "optimizer = torch.optim.SGD([{'params': getattr(net, k).parameters(), 'lr': v} for k, v in lrs.items()])\n")
    code = C.norm("batch", read_names(source)).code
    compile(code, "pasted", "exec")
    assert "getattr" not in code.split("#")[0]
