"""Remedies for where a NaN/Inf was made (`candidates.from_origin`): an activation written as a class
of the script's is swapped; a batch that held NaN is set to 0 where the model takes it; a loss's
arithmetic gets no trial. Checked against the printed change run by hand."""

import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose.finding import Finding
from gradwatch.fix import at_the_origin, fix
from gradwatch.fix.candidates import GENERIC, adam, aimed, clip_norm, finite_inputs, from_origin, lr_scale, reinit
from gradwatch.fix.inject import apply_to_model, finite_first
from gradwatch.fix.locate import NonFiniteLocator, Origin


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


class ScaledExp(nn.Module):  # parameters of its own: no activation to swap
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.exp(self.scale * x)


def _exp_mlp(width: int = 6, depth: int = 6) -> nn.Sequential:
    layers = [m for _ in range(depth) for m in (nn.Linear(width, width), Exp())]
    return nn.Sequential(*layers, nn.Linear(width, 1), nn.Sigmoid())


def test_the_locator_names_an_activation_class_and_not_a_module_with_parameters():
    torch.manual_seed(0)
    model = _exp_mlp()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(20)  # exp of exp overflows in the first forward
    with NonFiniteLocator() as locator:
        model(torch.randn(16, 6)).sum().backward()
    assert locator.origin is not None and locator.origin.made_here and locator.origin.module == "Exp"
    scaled = nn.Sequential(ScaledExp())
    with NonFiniteLocator() as locator:
        scaled(torch.full((1, 2), 200.0)).sum().backward()
    assert locator.origin is not None and locator.origin.op == "aten.exp.default" and locator.origin.module == ""


def test_which_origin_gets_which_remedy():
    held = Origin("aten.slice.Tensor", "/x/t.py", 3, "xb = x[a:b]", False, "NaN")
    in_class = Origin("aten.exp.default", "/x/t.py", 9, "return torch.exp(x)", True, "Inf", module="Exp")
    in_loss = Origin("aten.log.default", "/x/t.py", 22, "return torch.log(var)", True, "NaN")
    gradient = Origin("aten.div.Tensor", "/x/t.py", 3, "d = x.sqrt()", True, "Inf", gradient_of="SqrtBackward0")
    assert [c.spec for c in from_origin(held)] == [{"inputs": "finite"}]
    assert [c.spec for c in from_origin(in_class)] == [{"swap": {"from": "Exp", "to": "LeakyReLU", "own": True},
                                                        "init": "auto"}]
    assert "swap_activations(model, Exp, lambda: nn.LeakyReLU(0.01)" in from_origin(in_class)[0].code  # not nn.Exp
    assert from_origin(in_loss) == [] and from_origin(gradient) == []
    assert "t.py:3" in finite_inputs(held).code


def test_training_remedies_follow_the_origins_own_and_at_the_first_step_only_model_changes_stay():
    in_class = Origin("aten.exp.default", "/x/t.py", 9, "return torch.exp(x)", True, "Inf", module="Exp")
    held = Origin("aten.slice.Tensor", "/x/t.py", 3, "xb = x[a:b]", False, "NaN")
    log = Origin("aten.log.default", "/x/t.py", 22, "return torch.log(var)", True, "NaN")
    trained = [lr_scale(0.1), adam(), clip_norm(2.0), reinit()]
    at_init = Finding("non_finite", "error", 0, (), "m", {"at_init": True, "grad_growth_before": float("nan")})
    later = Finding("non_finite", "error", 12, (), "m", {"at_init": False, "grad_growth_before": 1.1})
    assert [c.name for c in at_the_origin(in_class, at_init, trained, GENERIC)] == \
        ["Exp -> LeakyReLU + He init", "re-initialise per activation"]
    # arithmetic the training drove out of its domain may be the lr's: those stay, after
    assert at_the_origin(in_class, later, trained, GENERIC)[1:] == trained
    assert at_the_origin(log, later, trained, GENERIC) == trained
    assert [c.spec for c in at_the_origin(held, later, trained, GENERIC)] == [{"inputs": "finite"}]  # the data's
    aimed_at = at_the_origin(held, later, trained, GENERIC, target="disc")
    assert aimed_at[0].spec == {"inputs": "finite", "target": "disc"} and aimed_at[0].name.endswith("(disc)")


def test_the_swap_of_a_class_of_the_scripts_keeps_the_output_and_says_when_it_is_not_in_the_model():
    model = _exp_mlp(depth=3)
    batch = torch.randn(4, 6)
    assert apply_to_model(model, {"swap": {"from": "Exp", "to": "LeakyReLU", "own": True}}, (batch,)) == ""
    assert [type(m).__name__ for m in model] == ["Linear", "LeakyReLU"] * 3 + ["Linear", "Sigmoid"]
    plain = nn.Sequential(nn.Linear(6, 1))
    assert "no Exp module" in apply_to_model(plain, {"swap": {"from": "Exp", "to": "LeakyReLU", "own": True}}, (batch,))


def test_only_the_models_first_argument_is_made_finite_as_nan_to_num_does():
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    mask = torch.tensor([0.0, -float("inf")])  # an attention mask: -inf on purpose
    out = finite_first((x, mask, 3))
    assert torch.equal(out[0], torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)) and out[1] is mask and out[2] == 3
    ids = torch.tensor([1, 2])
    assert finite_first((ids,))[0] is ids and finite_first(()) == ()
    held = Origin("aten.slice.Tensor", "/x/t.py", 3, "xb = x[a:b]", False, "NaN")
    assert "disc(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))" in finite_inputs(held, GENERIC.aimed_at("disc")).code
    assert aimed(finite_inputs(held), "disc").spec["target"] == "disc"


class L2Norm(nn.Module):  # parameterless, but no activation: a division's guard, not a swap
    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True)


class Attention(nn.Module):  # parameterless, several inputs
    def forward(self, q, k, v):
        return torch.exp(q @ k.T) @ v


def test_only_an_overflowing_one_input_module_is_named_for_a_swap():
    with NonFiniteLocator() as locator:
        L2Norm()(torch.zeros(2, 3, requires_grad=True)).sum().backward()
    assert locator.origin is not None and locator.origin.op == "aten.div.Tensor" and locator.origin.module == ""
    q = torch.full((2, 3), 30.0, requires_grad=True)
    with NonFiniteLocator() as locator:
        Attention()(q, q, q).sum().backward()
    assert locator.origin is not None and locator.origin.op == "aten.exp.default" and locator.origin.module == ""


def _train(swap_by_hand: bool = False) -> None:
    torch.manual_seed(0)
    x = torch.randn(20, 16, 6) * 3
    y = (x.sum(-1, keepdim=True) > 0).float()
    model = _exp_mlp()
    if swap_by_hand:  # the printed change, pasted before the optimizer is built
        model, _ = gw.modify.swap_activations(model, Exp, lambda: nn.LeakyReLU(0.01), keep_output=True,
                                              example_input=x[0])
        gw.init_(model, "auto", example_input=x[0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(20):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[i]), y[i]).backward()
        opt.step()
    torch.save(model.state_dict(), "weights.pt")


def test_fix_swaps_the_activation_that_overflowed_and_trains_as_the_printed_change(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = fix(_train, out=tmp_path / "fix", budget_steps=30, progress=lambda m: None)
    assert result.baseline.findings[0].kind == "non_finite" and result.origin.module == "Exp"
    assert not result.screened and [t.candidate.name for t in result.trials] == ["Exp -> LeakyReLU + He init"]
    assert result.repaired
    _train(swap_by_hand=True)
    trained, by_hand = torch.load(result.winner.run_dir / "written" / "weights.pt"), torch.load("weights.pt")
    assert list(trained) == list(by_hand) and all(torch.equal(trained[k], by_hand[k]) for k in by_hand)
