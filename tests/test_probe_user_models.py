"""The probe on models written the way users write them: activations called as functions in the
forward (F.relu, torch.tanh), activations other than ReLU/tanh/sigmoid, several inputs. The remedies
it prints must heal the verdict when pasted."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gw
from gradwatch.probe.core import _example_code


class FunctionalMLP(nn.Module):
    """A hand-written MLP: nn.Linear layers, the activation called in forward (no module to see)."""

    def __init__(self, depth: int = 12, width: int = 64, act=F.relu):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16 if i == 0 else width, width) for i in range(depth)])
        self.head = nn.Linear(width, 4)
        self.act = act

    def forward(self, x):
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


def _min_gain(model, x):
    r = gw.probe(model, x, iters=0)
    return r, min(l.gain_to_top for l in r.layers if math.isfinite(l.gain_to_top))


def _paste(code: str, model: nn.Module) -> nn.Module:
    ns = {"model": model, "gw": gw, "nn": nn, "torch": torch}
    exec(code, ns)  # noqa: S102  the remedy as a user pastes it
    return ns["model"]


@pytest.mark.parametrize("act, nonlinearity", [(F.relu, "relu"), (torch.tanh, "tanh")])
def test_functional_activation_remedies_heal_when_pasted(act, nonlinearity):
    # torch's default init (σ_w² = 1/3) on 12 layers vanishes. The remedies used to say gw.init_(model)
    # and nonlinearity="linear" for every layer (no activation module): an F.relu net stayed at 1e-3.
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    model = FunctionalMLP(act=act)
    r, gain = _min_gain(model, x)
    assert r.verdict == "vanishing" and gain < 1e-2
    f = next(f for f in r.findings if f.kind == "vanishing_gradient")
    codes = [rem.code for rem in f.remedies if "init" in rem.code]
    assert codes[0] == "gw.init_(model, example_input=torch.randn(32, 16))"
    assert "# followed by " + ("relu" if act is F.relu else "tanh") in codes[1]
    for code in codes:
        torch.manual_seed(1)
        healed = _paste(code, FunctionalMLP(act=act))
        r2, gain2 = _min_gain(healed, x)
        assert r2.verdict == "healthy" and gain2 > 0.1, (code, gain2)


def test_probe_with_functional_activations_leaves_rng_and_modes():
    # the advice needs one more forward (eval mode, no grad): the global RNG and every module's
    # training flag are as they were, and the model's weights too
    torch.manual_seed(0)
    model = FunctionalMLP()
    model.layers[3].eval()
    x = torch.randn(8, 16)
    state = torch.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gw.probe(model, x, iters=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert [m.training for m in model.modules()] == [True, True] + [i != 3 for i in range(12)] + [True]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_functional_sigmoid_gets_the_forward_edit_not_a_module_swap():
    torch.manual_seed(0)
    r = gw.probe(FunctionalMLP(act=torch.sigmoid), torch.randn(16, 16), iters=0)
    f = next(f for f in r.findings if f.kind == "vanishing_gradient")
    actions = [rem.action for rem in f.remedies]
    assert any("leaky_relu where it calls torch.sigmoid" in a for a in actions)
    assert not any("swap_activations(model, nn.Sigmoid" in rem.code for rem in f.remedies)  # reaches no call
    assert any("saturating activations (sigmoid)" in c for c in f.causes)


def test_gelu_mlp_plain_torch_init_is_he_as_init_():
    # nn.GELU, nn.SiLU ... are of the ReLU family for gw.init_ (He); the plain-torch loop said gain 1
    # ("linear") for them, and a 12-layer GELU net stayed vanishing after it
    torch.manual_seed(0)
    layers = []
    for i in range(12):
        layers += [nn.Linear(16 if i == 0 else 64, 64), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(64, 4))
    x = torch.randn(32, 16)
    r, _ = _min_gain(model, x)
    f = next(f for f in r.findings if f.kind == "vanishing_gradient")
    loop = next(rem.code for rem in f.remedies if rem.code.startswith("for w in"))
    assert '# followed by gelu\n    nn.init.kaiming_normal_(w, nonlinearity="relu")' in loop
    _, gain = _min_gain(_paste(loop, model), x)
    assert gain > 0.05


def test_example_code_matches_the_batch():
    assert _example_code(torch.randn(4, 3, 8, 8)) == "torch.randn(4, 3, 8, 8)"
    assert _example_code(torch.randn(2, 5, dtype=torch.float64)) == "torch.randn(2, 5, dtype=torch.float64)"
    assert _example_code(torch.tensor([[1, 7], [0, 2]])) == "torch.randint(0, 8, (2, 2))"
    assert _example_code((torch.randn(2, 3), torch.randn(2, 1))) == "(torch.randn(2, 3), torch.randn(2, 1),)"
    assert _example_code({"x": torch.randn(2)}) == ""


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(4 * 4 * 4, 3)  # 8×8 inputs

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


@pytest.mark.parametrize("shape, said", [
    ((2, 1, 12, 12), "layer 'head' (Linear) takes (*, 64), got (2, 144)"),
    ((2, 8, 8), "layer 'features.0' (Conv2d) takes (N, 1, H, W), got (2, 8, 8)"),
])
def test_wrong_input_shape_names_the_layer_and_the_shape_it_takes(shape, said):
    # torch says "mat1 and mat2 shapes cannot be multiplied (2x144 and 64x3)": no layer, no layout
    from gradwatch.errors import ConfigError
    from gradwatch.probe.inputs import check_fits
    torch.manual_seed(0)
    model = SmallCNN()
    with pytest.raises(ConfigError, match=r"\(at test_probe_user_models\.py:\d+\)") as cli:
        check_fits(model, torch.randn(shape), "m:f")
    assert said in str(cli.value)
    with pytest.raises(ConfigError) as api:
        gw.probe(model, torch.randn(shape), iters=0)
    assert said in str(api.value)
    assert not model._forward_hooks and not model.features[0]._forward_pre_hooks  # hooks removed
    assert not model.head._forward_hooks and not model.head._forward_pre_hooks


def test_input_reshaped_before_any_layer_names_what_the_first_layer_takes():
    from gradwatch.errors import ConfigError
    from gradwatch.probe.inputs import check_fits

    class Flat(SmallCNN):
        def forward(self, x):
            return super().forward(x.view(x.shape[0], 1, 8, 8))

    with pytest.raises(ConfigError, match=r"its first layer 'features.0' \(Conv2d\) takes \(N, 1, H, W\)"):
        check_fits(Flat(), torch.randn(2, 50), "m:f")


def test_json_into_a_closed_pipe_is_no_traceback(monkeypatch, tmp_path):
    # `gradwatch probe ... --json | head -2` printed a BrokenPipeError traceback
    import argparse
    import io
    import sys

    from gradwatch.cli import probe_cmd

    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise io.UnsupportedOperation("fileno")

    (tmp_path / "tiny_probe_model.py").write_text(
        "from torch import nn\ndef make():\n    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    args = argparse.Namespace(factory="tiny_probe_model.py:make", input_shape="4,4", loss=None, num_classes=None,
                              vocab=None, iters=0, seed=0, png=None, json=True)
    assert probe_cmd.main(args) == 1


def test_plain_rnn_remedies_all_run_when_pasted():
    # "use a gated cell" carried the sentence "nn.LSTM / nn.GRU instead of nn.RNN" as its code: a
    # SyntaxError when pasted. ρ(W_hh) = 0.5 vanishes (Pascanu et al. 2013); orthogonal W_hh heals it.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(3, 16, batch_first=True)
            with torch.no_grad():
                self.rnn.weight_hh_l0.copy_(0.5 * torch.linalg.qr(torch.randn(16, 16))[0])
            self.fc = nn.Linear(16, 1)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    x = torch.randn(4, 30, 3)
    r = gw.probe(Net(), x, iters=0)
    f = next(f for f in r.findings if f.kind == "vanishing_gradient")
    assert len(f.remedies) == 2
    for rem in f.remedies:
        torch.manual_seed(1)
        pasted = _paste(rem.code, Net())
        r2 = gw.probe(pasted, x, iters=0)
        if "orthogonal" in rem.code:
            assert r2.recurrent[0].direction == "within range"
        else:
            assert isinstance(pasted.rnn, nn.GRU)


# --- mean field at finite depth -----------------------------------------------------------------

def gelu_mlp(depth: int = 12, he: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for i in range(depth):
        layers += [nn.Linear(16 if i == 0 else 64, 64), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(64, 4))
    for m in model:
        if he and isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


def test_he_init_gelu_mlp_is_not_called_too_deep():
    # χ₁ at q* ≈ 0.01 is 0.52 (ξ 1.5, so 13 layers > 6ξ), but from the first layer's q ≈ 2 a ReLU-like
    # GELU loses under 10% of its variance a layer: the finite-depth mean field and the measurement
    # agree on a gain of order 1 (0.75 predicted, 0.97 measured here), and the He init the probe itself recommends was flagged vanishing
    r = gw.probe(gelu_mlp(), torch.randn(32, 16, generator=torch.Generator().manual_seed(0)), iters=0)
    mf = r.mean_field
    assert mf.too_deep and mf.chi1 < 0.6  # the infinite-depth reading is unchanged
    measured = r.layers[0].gain_to_top
    assert 0.3 < measured < 1.5 and 0.5 < mf.gain < 1  # (64 wide: the measurement fluctuates ±30%)
    assert r.verdict == "healthy" and not r.findings
    assert "> 6ξ; from q=" in "\n".join(r.summary_lines()) and "too deep" not in "\n".join(r.summary_lines())


def test_finite_depth_gain_closed_form_and_measured():
    from gradwatch.probe.meanfield import finite_gain
    # ReLU: χ₁ = σ_w²/2 whatever q, so the gain over L layers is (σ_w²/2)^((L−1)/2)
    assert finite_gain(nn.ReLU(), 1 / 3, 0.0, 1.0, 21) == pytest.approx((1 / 6) ** 10, rel=1e-6)
    # a default-init GELU MLP (σ_w² = 1/3) vanishes; the prediction follows the measured gain
    r = gw.probe(gelu_mlp(he=False), torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), iters=0)
    assert r.layers[0].gain_to_top < 1e-4
    assert math.log(r.mean_field.gain) == pytest.approx(math.log(r.layers[0].gain_to_top), rel=0.1)
    assert r.verdict == "vanishing"


def test_depth_scale_warning_remedy_is_he_for_relu_family():
    # the critical-init remedy of the mean-field warning said σ_w² = 1 for every activation but ReLU:
    # for GELU that is torch's own default scale, χ₁ < 1/2 per layer
    from gradwatch.probe.meanfield import MeanField
    from gradwatch.probe.result import LayerProbe
    from gradwatch.probe.verdict import layer_findings
    layers = [LayerProbe(i, str(2 * i), "Linear", "gelu") for i in range(20)]
    for x in layers:
        x.gain_to_top, x.verdict = 0.5, "healthy"
    mf = MeanField("gelu", 0.5, 0.0, 0.0, 0.3, 0.83, 20, True, gain=1e-5)
    (f,) = layer_findings(layers, mf)
    assert "std=(2 / m.in_features) ** 0.5" in f.remedies[0].code
    assert not layer_findings(layers, MeanField("gelu", 2.0, 0.0, 0.01, 0.52, 1.5, 20, True, gain=0.6))


@pytest.mark.parametrize("func, module", [(F.relu, nn.ReLU), (torch.tanh, nn.Tanh), (torch.sigmoid, nn.Sigmoid)])
def test_functional_activation_reads_as_its_module(func, module):
    # F.relu(self.fc(x)) in a forward: the table's act column was empty, `dead` and `saturated` were
    # taken of the Linear's output (never dead), and the mean field was not computed. The same
    # weights behind nn.ReLU modules are the reference: every number equal.
    torch.manual_seed(0)
    fmodel = FunctionalMLP(depth=6, act=func)
    seq = nn.Sequential(*[m for layer in fmodel.layers for m in (layer, module())], fmodel.head)
    with torch.no_grad():
        fmodel.layers[2].bias.fill_(-3.0)  # some dead ReLU units, some saturated sigmoids/tanh
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    rf, rm = gw.probe(fmodel, x, iters=0), gw.probe(seq, x, iters=0)
    assert [l.activation for l in rf.layers] == [l.activation for l in rm.layers] == [module().__class__.__name__.lower()] * 6 + [""]
    for a, b in zip(rf.layers, rm.layers):
        for k in ("act_mean", "act_std", "saturated", "dead", "grad_out_norm", "grad_w_norm"):
            va, vb = getattr(a, k), getattr(b, k)
            assert (math.isnan(va) and math.isnan(vb)) or va == pytest.approx(vb, rel=1e-6), (a.name, k)
    if func is F.relu:
        assert rf.layers[2].dead > 0.5
    assert rf.mean_field is not None and rf.mean_field.chi1 == pytest.approx(rm.mean_field.chi1, rel=1e-9)
    assert rf.mean_field.gain == pytest.approx(rm.mean_field.gain, rel=1e-9)


def test_a_deep_silu_mlp_is_told_to_normalise_first_and_is_healthy_after_it():
    # SiLU is ~x/2 near 0: no weight scale keeps its signal through 20 layers (He's shrinks it into
    # that regime); the probe, like diagnose, puts normalisation first, and pasted it heals the net
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(64, 64), nn.SiLU())], nn.Linear(64, 10))
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    r, gain = _min_gain(model, x)
    f = next(f for f in r.findings if f.kind == "vanishing_gradient")
    assert f.causes[0].startswith("silu is ~x/2 near 0") and "insert_norm" in f.remedies[0].code
    assert gain < 1e-6
    healed, after = _min_gain(_paste("model, _ = " + f.remedies[0].code, model), x)
    assert after > 0.05 and not [f for f in healed.findings if f.kind == "vanishing_gradient"]


def test_the_plain_torch_loop_initialises_each_layer_at_gw_init_s_scale():
    """The printed loop is "the same init in plain torch": every layer's weight std after pasting it
    matches gw.init_'s, the output layer (no activation after it: Xavier) included. (Behind a sigmoid
    the loop is the init of the ReLU that should replace it, so a tanh net.)"""
    def tanh_mlp():
        return nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(64, 64, bias=False), nn.Tanh())],
                             nn.Linear(64, 10))

    torch.manual_seed(0)
    model = tanh_mlp()
    with torch.no_grad():
        for m in model[:-1:2]:
            m.weight.mul_(0.3)  # vanishing: the probe gives its init remedies
    r = gw.probe(model, torch.randn(32, 64), iters=0)
    loop = next(rem.code for f in r.findings for rem in f.remedies if "for w in" in rem.code)
    torch.manual_seed(1)
    pasted = _paste(loop, tanh_mlp())
    torch.manual_seed(1)
    reference = tanh_mlp()
    gw.init_(reference)
    for a, b in zip(pasted, reference):
        if isinstance(a, nn.Linear):  # 640 to 4096 draws each: the std within 10%
            assert a.weight.std().item() == pytest.approx(b.weight.std().item(), rel=0.1), a
