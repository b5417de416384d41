"""probe() as a library call: what it leaves untouched, what it accepts, what it refuses."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose.finding import Finding
from gradwatch.probe import probe
from gradwatch.probe.core import SEED_OFFSET, projection_loss, sumsq_loss
from gradwatch.probe.recurrent import _module_cell, bptt_profile


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_model_is_left_as_it_was():
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 8, 8)
    rng = torch.get_rng_state()
    r = probe(model, x, iters=5)
    assert torch.equal(torch.get_rng_state(), rng)  # probe vectors use their own generator
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BatchNorm running stats
    assert all(p.grad is None for p in model.parameters())
    assert model[2].inplace and model[4].inplace
    assert [x.name for x in r.layers] == ["0", "1", "3", "7"]
    assert [x.activation for x in r.layers] == ["", "relu", "relu", ""]
    assert r.layers[1].dead >= 0 and math.isnan(r.layers[1].saturated)


def test_inplace_relu_does_not_hide_the_pre_activation_gradient():
    """With ReLU(inplace=True) the BatchNorm output is overwritten; the probe makes it out-of-place
    so ∂L/∂s is the pre-activation gradient (zero where the unit is off), as with inplace=False."""
    x = torch.randn(4, 3, 8, 8)
    a, b = small_cnn(), small_cnn()
    b[2].inplace = b[4].inplace = False
    ra, rb = probe(a, x, iters=0), probe(b, x, iters=0)
    for la, lb in zip(ra.layers, rb.layers):
        assert la.grad_out_norm == pytest.approx(lb.grad_out_norm, rel=1e-5)


def test_json_is_strict_and_findings_roundtrip():
    r = probe(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)), torch.randn(3, 4), iters=3)
    text = r.to_json()
    d = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert d["layers"][1]["saturated"] is None and d["layers"][0]["saturated"] is not None
    assert [Finding.from_dict(f) for f in d["findings"]] == r.findings


def test_transformer_with_attention_and_loss_on_labels():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    y = torch.randn(2, 5, 16)
    r = probe(model, torch.randn(2, 5, 8), lambda out: nn.functional.mse_loss(out, y), iters=5)
    names = [x.name for x in r.layers]
    assert "1.layers.0.self_attn" in names and "1.layers.1.norm2" in names
    attn = r.layer("1.layers.0.self_attn")
    assert attn.grad_w_norm > 0 and math.isfinite(attn.sigma_max)  # out_proj's weights counted here
    assert not r.notes and r.mean_field is None


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
def test_recurrent_replay_equals_the_module(cls):
    torch.manual_seed(0)
    m = cls(5, 7, num_layers=2, batch_first=True)
    x = torch.randn(3, 6, 5)
    expected = m(x)[0]
    seq = x.transpose(0, 1)
    for layer in range(2):
        cell, w_hh, _ = _module_cell(m, layer)
        h0 = torch.zeros(3, 7)
        _, states = bptt_profile(cell, list(seq), (h0, h0.clone()) if cls is nn.LSTM else h0)
        seq = torch.stack([s[0] if isinstance(s, tuple) else s for s in states])
        assert w_hh.shape == (7, 7)
    torch.testing.assert_close(seq.transpose(0, 1), expected.detach())


def test_cells_called_per_step_are_probed():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.head = nn.GRUCell(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = None
            for t in range(x.shape[1]):
                h = self.cell(x[:, t], h)
            return self.head(h)

    r = probe(Loop(), torch.randn(3, 15, 4), iters=3)
    (rec,) = r.recurrent
    assert rec.name == "cell" and rec.kind == "GRUCell" and len(rec.profile) == 16
    assert rec.profile[0] == 1.0 and math.isfinite(rec.spectral_norm)


def test_remedies_name_only_what_the_probe_measured_and_what_applies():
    """A GRU cell whose gradient vanishes through time was told to use nn.LSTM / nn.GRU instead of
    nn.RNN; with iters=0 (no Jacobian measured) a cause read "singular value nan per layer"."""
    from gradwatch.probe.recurrent import RecurrentProbe
    from gradwatch.probe.verdict import recurrent_findings

    def remedies(kind):
        rec = RecurrentProbe("cell", kind, 0, [1.0, 1e-4], 2, "vanishing", 1e-2, spectral_norm=0.1, bound=1.0)
        return [r.code for f in recurrent_findings([rec]) for r in f.remedies]

    assert not any("instead of" in c or "replace_rnn" in c for c in remedies("GRUCell"))
    assert any(c == "model, _ = gw.modify.replace_rnn(model)" for c in remedies("RNN"))  # code that runs
    assert any(c.startswith("# build model.cell as nn.GRUCell") for c in remedies("RNNCell"))
    torch.manual_seed(0)
    deep = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(32, 32), nn.Sigmoid())], nn.Linear(32, 2))
    r = probe(deep, torch.randn(16, 32), iters=0)
    causes = [c for f in r.findings for c in f.causes]
    assert any(c.startswith("initial weights too small") for c in causes) and not any("nan" in c for c in causes)


@pytest.mark.parametrize("bad,match", [
    (dict(iters=-1), "iters must be a non-negative integer"),
    (dict(loss_fn=lambda out: out), "loss_fn must return a scalar"),
    (dict(loss_fn=3), "loss_fn must be a function"),
    (dict(seed=1180591620717411303424), r"seed must be an integer in \[-2\*\*63, 2\*\*63\)"),
    (dict(batch=torch.randn(4, 5)), r"Linear failed on the probe batch \(RuntimeError: mat1 and mat2"),
    # these were a ZeroDivisionError from the spectra and a bare IndexError from inside torch
    (dict(batch=torch.randn(0, 3)), r"the probe batch is empty \(shape \(0, 3\)\); pass at least one sample"),
    (dict(loss_fn=lambda out: nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 9]))),
     r"loss_fn failed on the model's output, a tensor of shape \(4, 2\) \(IndexError: .*\(at test_probe_api.py:\d+\)"),
    # an AttributeError and a StopIteration from inside the recorder, a TypeError after the backward
    (dict(cells=["nope"]), r"cells: 'nope' is not a submodule of Sequential"),
    (dict(cells=[3]), r"cells: 3 is not a submodule"),
    (dict(progress=3), r"progress must be a function progress\(done, total, layer\), got int"),
])
def test_bad_arguments(bad, match):
    """A clear ConfigError, and the model's BatchNorm statistics untouched even when it fails late."""
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    kwargs = {"batch": torch.randn(4, 3), **bad}
    if "batch" in bad:
        model = model[2]
    before = [b.clone() for b in model.buffers()]
    with pytest.raises(gw.ConfigError, match=match):
        probe(model, kwargs.pop("batch"), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


def test_no_layers():
    with pytest.raises(gw.ConfigError, match="no layers"):
        probe(nn.Sequential(nn.Tanh()), torch.randn(2, 3))


def test_exploding_verdict_and_clipping_remedy():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(64, 64), nn.ReLU())], nn.Linear(64, 4))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=(6.0 / 64) ** 0.5)  # σ_w² = 6: χ₁ = 3 per layer
    r = probe(model, torch.randn(16, 64), iters=3)
    assert r.verdict == "exploding"
    f = next(f for f in r.findings if f.kind == "exploding_gradient")
    assert any("clip_grad_norm_" in m.code for m in f.remedies)
    assert r.mean_field.chi1 == pytest.approx(3.0, rel=0.1)


def test_remedies_are_runnable_code_that_fixes_the_verdict():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(32, 32), nn.Sigmoid())], nn.Linear(32, 4))
    x = torch.randn(16, 32)
    before = probe(model, x, iters=3)
    assert before.verdict == "vanishing"
    (f,) = before.findings
    namespace = {"gw": gw, "nn": nn, "torch": torch, "model": model}
    for remedy in f.remedies:
        exec(remedy.code, namespace)  # noqa: S102  the codes are meant to be pasted as they are
    assert probe(model, x, iters=3).verdict == "healthy"


@pytest.mark.parametrize("act", [lambda: nn.ReLU(inplace=True), nn.PReLU])
def test_mean_field_leaves_the_activation_modules_as_they_were(act):
    """The mean-field quadrature ran the model's own activation module: an in-place ReLU failed on its
    leaf, a PReLU was left in float64 (the model's next forward failed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    before, expected = copy.deepcopy(model.state_dict()), model(x).detach()
    r = probe(model, x, iters=0)
    assert r.mean_field is not None
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert all(m.inplace for m in model if isinstance(m, nn.ReLU))
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_probe_under_no_grad_or_inference_mode_equals_torch_gradients(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    loss = 0.5 * model(x).pow(2).sum() / 4
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, model[0].parameters())]).norm()
    with mode():
        r = probe(model, x, sumsq_loss, iters=3)
    assert r.layers[0].grad_w_norm == pytest.approx(float(expected), rel=1e-5)
    assert math.isfinite(r.layers[0].sigma_max)


def test_model_made_under_inference_mode_is_a_config_error():
    with torch.inference_mode():
        model = nn.Linear(3, 2)
    with pytest.raises(gw.ConfigError, match=r"Linear.weight was created under torch.inference_mode"):
        probe(model, torch.randn(4, 3))


def test_dataclass_output_and_detached_first_output():
    """A dataclass output: its first tensor field that requires grad is the output; a loss that does
    not depend on the parameters is a ConfigError, not autograd's "does not require grad"."""
    import dataclasses

    @dataclasses.dataclass
    class Out:
        step: torch.Tensor
        logits: torch.Tensor

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return Out(torch.tensor(3.0), self.fc(x))

    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 8)
    r = probe(model, x, sumsq_loss, iters=0)
    out = model.fc(x)
    grads = torch.autograd.grad(0.5 * out.pow(2).sum() / 4, model.fc.parameters())
    expected = torch.cat([g.flatten() for g in grads]).norm()
    assert r.layers[0].grad_w_norm == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(gw.ConfigError, match="does not depend on Net's parameters"):
        probe(model, x, lambda o: o.step, iters=0)
    with pytest.raises(gw.ConfigError, match="returned tuple with no tensor in it"):
        sumsq_loss(("a", 1))
    with pytest.raises(gw.ConfigError, match="returned tuple with no tensor in it"):
        projection_loss(torch.Generator())(("a", 1))


def _small_gamma(model: nn.Module, gamma: float) -> nn.Module:
    """Every normalisation layer's scale set to `gamma`: each one multiplies the gradient by about gamma."""
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.constant_(m.weight, gamma)
    return model


@pytest.mark.parametrize("kind", ["transformer", "conv_bn"])
def test_remedy_code_runs_on_models_with_attention_and_norms(kind):
    """Remedies once named `model.layers[0].self_attn.weight` (MultiheadAttention has none) and a
    LayerNorm's 1-D weight (kaiming_normal_ raises), and blamed missing normalisation/residuals."""
    torch.manual_seed(0)
    if kind == "transformer":
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        model = _small_gamma(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), 0.02)
        x = torch.randn(2, 5, 16)
    else:
        model = _small_gamma(nn.Sequential(*[m for c in (3, 8, 8) for m in (
            nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())], nn.Flatten(), nn.Linear(8 * 36, 4)), 0.02)
        model.eval()  # running statistics (variance 1): the small scale is not divided out
        x = torch.randn(4, 3, 6, 6)
    target = torch.randn_like(model(x))
    r = probe(model, x, lambda out: nn.functional.mse_loss(out, target), iters=0)
    assert r.verdict == "vanishing" and r.findings
    for f in r.findings:
        assert not any("without residual connections or normalisation" in c for c in f.causes)
        for remedy in f.remedies:
            exec(remedy.code, {"gw": gw, "nn": nn, "torch": torch, "model": model})  # noqa: S102


def _grad_norm(loss: torch.Tensor, params) -> float:
    grads = torch.autograd.grad(loss, list(params), retain_graph=True)
    return float(torch.cat([g.flatten() for g in grads]).norm())


def test_bare_weights_of_the_root_and_of_a_parameter_list_get_their_own_gradient_only():
    """A root's cls/pos parameters were one fake layer (named after the last key, ∂L/∂s = the model's
    output gradient), and a ParameterList MLP "had no layers"."""
    class ClsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls, self.pos = nn.Parameter(torch.randn(1, 1, 8)), nn.Parameter(torch.randn(1, 5, 8))
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
            return self.fc2(torch.tanh(self.fc1(x)))[:, 0]

    class ListNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.ws = nn.ParameterList([nn.Parameter(torch.randn(6, 6) / 6 ** 0.5) for _ in range(3)])

        def forward(self, x):
            for w in self.ws:
                x = torch.tanh(x @ w.T)
            return x

    torch.manual_seed(0)
    for model, x, names in ((ClsNet(), torch.randn(4, 4, 8), ["cls", "pos", "fc1", "fc2"]),
                            (ListNet(), torch.randn(4, 6), ["ws.0", "ws.1", "ws.2"])):
        r = probe(model, x, sumsq_loss, iters=0)
        assert [x.name for x in r.layers] == names
        loss = 0.5 * model(x).pow(2).sum() / 4
        for name, p in model.named_parameters():
            if "." not in name or name.startswith("ws."):
                assert r.layer(name).type == "Parameter" and math.isnan(r.layer(name).grad_out_norm)
                assert r.layer(name).grad_w_norm == pytest.approx(_grad_norm(loss, [p]), rel=1e-5)


@pytest.mark.parametrize("which", ["weight_norm", "spectral_norm"])
def test_a_parametrized_linear_is_one_layer_with_its_original_parameters(which):
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(getattr(parametrizations, which)(nn.Linear(8, 8)), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    r = probe(model, x, sumsq_loss, iters=0)
    assert [x.name for x in r.layers] == ["0", "2"]
    loss = 0.5 * model(x).pow(2).sum() / 4
    assert r.layers[0].grad_w_norm == pytest.approx(_grad_norm(loss, model[0].parameters()), rel=1e-5)


def test_the_submodules_of_a_cell_are_not_depth_layers():
    class MyCell(nn.Module):
        def __init__(self):
            super().__init__()
            self.ih, self.hh, self.act = nn.Linear(4, 6), nn.Linear(6, 6, bias=False), nn.Tanh()

        def forward(self, x, h):
            return self.act(self.ih(x) + self.hh(h))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.cell, self.fc = nn.Linear(4, 4), MyCell(), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.zeros(x.shape[1], 6)
            for t in range(x.shape[0]):
                h = self.cell(self.lin(x[t]), h)
            return self.fc(h)

    torch.manual_seed(0)
    r = probe(Net(), torch.randn(5, 3, 4), cells=["cell"], iters=0)
    assert sorted({x.name.split("#")[0] for x in r.layers}) == ["fc", "lin"]
    assert all(x.activation == "" for x in r.layers)  # the cell's Tanh follows no depth layer
    assert [c.name for c in r.recurrent] == ["cell"]


def test_the_default_loss_is_a_random_projection_that_a_normalised_output_does_not_cancel():
    """Post-LN TransformerEncoder: ½Σy²/B = T·d/2 whatever the weights, so its gradient is rounding noise
    (the probe used to say ERROR vanishing). The default ⟨r, y⟩/B, r standard normal from the seed, has
    ∂L/∂y = r/B whatever the output: every layer gets a real gradient."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model, x = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.randn(3, 5, 16)
    w = model.layers[0].linear1.weight
    y = model(x)
    constant = torch.autograd.grad(0.5 * y.pow(2).sum() / 3, w, retain_graph=True)[0].norm()
    real = torch.autograd.grad(nn.functional.mse_loss(y, torch.randn_like(y)), w)[0].norm()
    assert constant < 1e-3 * real
    r = probe(model, x, iters=0)
    assert r.verdict == "healthy" and not r.notes
    assert r.layer("layers.0.linear1").grad_w_norm > 1e-2 * float(real)
    lin, x = nn.Linear(16, 4), torch.randn(3, 16)
    proj = torch.randn(3, 4, generator=torch.Generator().manual_seed(5 ^ SEED_OFFSET), dtype=torch.float64).float()
    plain = probe(lin, x, iters=0, seed=5)
    assert plain.loss == pytest.approx(float((proj * lin(x)).sum() / 3), rel=1e-6)
    assert plain.layers[0].grad_out_norm == pytest.approx(float(proj.norm() / 3), rel=1e-6)


def _gap_net() -> nn.Module:
    torch.manual_seed(0)
    mods, c = [], 3
    for _ in range(3):
        conv = nn.Conv2d(c, 8, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        mods += [conv, nn.BatchNorm2d(8), nn.ReLU()]
        c = 8
    return nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def test_global_average_pooling_does_not_make_the_verdict_depend_on_resolution():
    """He-init conv+BN+ReLU with a global average pool head: ‖∂L/∂s‖ before the pool falls as 1/√(HW)
    (torch's own gradients below), so at 96×96 the raw ratio to the head was < 1e-2 ("vanishing")
    while at 8×8 it was not. The probe divides the pool's 1/√P out; a deep sigmoid net still vanishes."""
    raw, verdicts = {}, {}
    for res in (8, 96):
        model, x = _gap_net(), torch.randn(4, 3, res, res)
        y = torch.randint(0, 5, (4,))
        loss_fn = lambda out: nn.functional.cross_entropy(out, y)  # noqa: E731
        outs = {}
        hooks = [model[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i in (1, 11)]
        loss = loss_fn(model(x))
        for h in hooks:
            h.remove()
        g_bn, g_top = torch.autograd.grad(loss, [outs[1], outs[11]])
        raw[res] = float(g_bn.norm() / g_top.norm())
        r = probe(model, x, loss_fn, iters=0)
        assert r.layer("1").gain_to_top == pytest.approx(raw[res] * res, rel=1e-4)  # × √P, P = res²
        verdicts[res] = r.verdict
    assert raw[96] < 1e-2 < raw[8]  # what the uncorrected ratio said
    assert verdicts == {8: "healthy", 96: "healthy"}
    torch.manual_seed(0)
    deep = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 2))
    assert probe(deep, torch.randn(8, 16), iters=0).verdict == "vanishing"


class _Pooled(nn.Module):
    """_gap_net's layers with the head pool written as a function, as most hand-written nets do."""

    def __init__(self, net: nn.Module, pool):
        super().__init__()
        self.features, self.fc, self.pool = net[:9], net[11], pool

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class _NormThenToken(nn.Module):
    """A hand-written RMSNorm (x.pow(2).mean(-1, keepdim=True)) before a first-token readout: its mean
    averages features, not positions."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.head(h[:, 0])


def test_a_functional_global_average_pool_is_divided_out_like_the_module():
    """x.mean((2, 3)), F.adaptive_avg_pool2d(x, 1), F.avg_pool2d(x, H) and a token mean x.mean(1) are the
    same head pool as nn.AdaptiveAvgPool2d(1): a ResNet written with x.mean((2, 3)) read 'vanishing' at
    64×64 and 'healthy' at 32×32. A LayerNorm-style mean over the last dimension is not a pool."""
    for res in (8, 32):
        x = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(res))
        ref = probe(_gap_net(), x, iters=0)
        for pool in (lambda t: t.mean((2, 3)), lambda t: nn.functional.adaptive_avg_pool2d(t, 1),
                     lambda t, r=res: nn.functional.avg_pool2d(t, r)):
            r = probe(_Pooled(_gap_net(), pool), x, iters=0)
            assert [y.gain_to_top for y in r.layers] == pytest.approx([y.gain_to_top for y in ref.layers], rel=1e-5)
    torch.manual_seed(0)
    body = [m for _ in range(4) for m in (nn.Linear(8, 8), nn.Tanh())]
    model = _Pooled(nn.Sequential(*body, *[nn.Identity()] * 3, nn.Linear(8, 3)),
                    lambda t: t.mean(1))  # (B, T, C) -> (B, C): a mean over 16 tokens
    r = probe(model, torch.randn(2, 16, 8), iters=0)
    raw = r.layer("features.0").grad_out_norm / r.layer("fc").grad_out_norm
    assert r.layer("features.0").gain_to_top == pytest.approx(raw * 4, rel=1e-6)  # √16 positions
    r = probe(_NormThenToken(), torch.randn(2, 5, 8), iters=0)
    assert r.layer("inp").gain_to_top == pytest.approx(r.layer("inp").grad_out_norm / r.layer("head").grad_out_norm)


def test_lstm_bptt_profile_equals_the_modules_own_state_gradients():
    """∂L_T/∂(h_k, c_k) from nn.LSTM run step by step from leaf states; the replay used to add the
    c_k -> h_k path into c_k's gradient (5–12% off)."""
    torch.manual_seed(0)
    m, xs = nn.LSTM(3, 8), torch.randn(12, 2, 3)
    cell, _, _ = _module_cell(m, 0)
    h0 = torch.zeros(2, 8)
    profile, _ = bptt_profile(cell, list(xs), (h0, h0.clone()), torch.Generator().manual_seed(1))
    r = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    r = r / r.norm(dim=1, keepdim=True)
    state = tuple(torch.zeros(1, 2, 8, requires_grad=True) for _ in range(2))
    states = [state]
    for t in range(xs.shape[0]):
        _, state = m(xs[t:t + 1], state)
        states.append(state)
    flat = [t for s in states for t in s]
    grads = torch.autograd.grad((r * state[0][0]).sum(), flat, allow_unused=True)  # c_T: unused
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(flat, grads)]
    norms = [float(torch.cat([g.flatten() for g in grads[2 * k:2 * k + 2]]).norm()) for k in range(len(states))]
    expected = [n / norms[-1] for n in norms[::-1]]
    assert profile == pytest.approx(expected, rel=1e-4)


def test_a_max_norm_embedding_table_is_restored():
    """nn.Embedding(max_norm=1) renormalises the rows it looks up in place during the forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 2))
    nn.init.normal_(model[0].weight, std=3.0)
    before = model[0].weight.detach().clone()
    r = probe(model, torch.tensor([[1, 2, 3]]), iters=0)
    assert torch.equal(model[0].weight, before) and r.layers[0].grad_w_norm > 0


def test_progress_is_called_once_per_layer_and_changes_nothing():
    """The CLI's progress bar: the spectra take --iters products per layer (18 s on a ResNet-18-like
    net, docs/probe.md) and the command used to be silent meanwhile."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    seen = []
    r = probe(model, x, iters=12, progress=lambda done, total, name: seen.append((done, total, name)))
    assert seen == [(0, 3, "0"), (1, 3, "2"), (2, 3, "4"), (3, 3, "")]
    plain = probe(model, x, iters=12)
    assert [y.sigma_max for y in r.layers] == [y.sigma_max for y in plain.layers]


class _LastState(nn.Module):
    """The usual LSTM classifier: reads h_n, never the output sequence."""

    def __init__(self):
        super().__init__()
        self.emb, self.lstm, self.fc = nn.Embedding(20, 6), nn.LSTM(6, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, tok):
        _, (h, _) = self.lstm(self.emb(tok))
        return self.fc(h[-1])


def test_a_recurrent_layer_read_by_its_final_state_has_its_gradient_measured():
    """‖∂L/∂s‖ of an LSTM whose model uses h_n only was NaN (only `out` was counted), so the layer had
    no gain and no verdict. It is ‖∂L/∂(out, h_n, c_n)‖, here torch's ‖∂L/∂h_n‖."""
    torch.manual_seed(0)
    model, tok = _LastState(), torch.randint(0, 20, (3, 7))
    r = probe(model, tok, sumsq_loss, iters=0)
    (out, (h, c)) = model.lstm(model.emb(tok))
    loss = 0.5 * model.fc(h[-1]).pow(2).sum() / 3
    (g,) = torch.autograd.grad(loss, [h])
    assert r.layer("lstm").grad_out_norm == pytest.approx(float(g.norm()), rel=1e-5)
    assert math.isfinite(r.layer("lstm").gain_to_top)


def test_a_packed_sequence_is_probed_on_its_longest_samples():
    """A GRU fed pack_padded_sequence was reported 'horizon beyond the sequence' with an empty profile
    ('not probed'). The replay now runs the samples of the longest length: the profile equals that of
    the same GRU on those samples unpacked, for both stacked layers, with an initial state."""
    from gradwatch.probe.recurrent import probe_module

    torch.manual_seed(0)
    gru = nn.GRU(3, 5, num_layers=2, batch_first=True)
    x, lengths, h0 = torch.randn(4, 6, 3), torch.tensor([6, 4, 2, 6]), torch.randn(2, 4, 5)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    got = probe_module("gru", gru, packed, h0, torch.Generator().manual_seed(1))
    ref = probe_module("gru", gru, x[[0, 3]], h0[:, [0, 3]], torch.Generator().manual_seed(1))
    assert [len(r.profile) for r in got] == [7, 7]
    for a, b in zip(got, ref):
        assert a.profile == pytest.approx(b.profile, rel=1e-6)
    assert "2 of 4 samples" in got[0].notes[0]

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru, self.fc = gru, nn.Linear(5, 2)

        def forward(self, x, lengths):
            _, h = self.gru(nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            return self.fc(h[-1])

    r = probe(Packed(), (x, lengths), iters=0)
    assert len(r.recurrent) == 2 and all(math.isfinite(x.rate) for x in r.recurrent)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_a_forgetful_gated_cell_gets_the_gate_bias_remedy_and_it_works(kind):
    """A default-init LSTM/GRU forgets at ~0.65 per step (memory gate σ(0) = 1/2): vanishing within 14
    steps. The remedy said nn.init.orthogonal_(weight_hh), which made it worse (horizon 12); pasting the
    memory-gate bias of 1 now offered pushes the horizon out (38 steps for this LSTM at width 32)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.rnn = kind(4, 8, num_layers=2, batch_first=True)
    x = torch.randn(4, 60, 4, generator=torch.Generator().manual_seed(0))
    loss = lambda out: out[0].sum()  # noqa: E731
    before = probe(model, x, loss, iters=0)
    r = before.recurrent[1]
    assert r.direction == "vanishing" and abs(r.gate_bias) < 0.5
    f = next(f for f in before.findings if f.layers == ("rnn",) and f.evidence["layer"] == 1)
    assert "orthogonal" not in " ".join(x.code for x in f.remedies)
    namespace = {"nn": nn, "torch": torch, "model": model}
    for remedy in f.remedies:
        exec(remedy.code, namespace)  # noqa: S102  pasted as it is
    after = probe(model, x, loss, iters=0).recurrent[1]
    assert after.gate_bias == pytest.approx(1.0) and after.rate > r.rate + 0.1
    assert after.horizon is None or after.horizon > 1.5 * r.horizon
    from gradwatch.probe.recurrent import RecurrentProbe
    from gradwatch.probe.verdict import recurrent_findings

    opened = RecurrentProbe("rnn", kind.__name__, 1, [1.0, 1e-4], 1, "vanishing", 1e-4, gate_bias=1.0)
    (f,) = recurrent_findings([opened])  # already opened and still vanishing: more, not the same again
    assert "fill_(2)" in f.remedies[0].code and "bias_ih_l1" in f.remedies[0].code


def test_the_remedy_for_a_model_that_is_itself_a_gated_cell_runs_when_pasted():
    """A bare nn.LSTM (the model itself, named 'LSTM' in the table) was told `model.LSTM.hidden_size`:
    an AttributeError when pasted."""
    torch.manual_seed(0)
    model = nn.LSTM(4, 8, batch_first=True)
    x = torch.randn(4, 60, 4, generator=torch.Generator().manual_seed(0))
    before = probe(model, x, lambda out: out[0].sum(), iters=0)
    f = next(f for f in before.findings if f.layers == ("LSTM",))
    namespace = {"nn": nn, "torch": torch, "model": model}
    exec(f.remedies[0].code, namespace)  # noqa: S102  pasted as it is
    assert "model.bias_ih_l0" in f.remedies[0].code
    assert model.bias_ih_l0[8:16].eq(1).all() and model.bias_hh_l0[8:16].eq(0).all()


def test_frozen_modules_are_named_in_the_notes():
    """A frozen first layer (requires_grad=False) vanished from the table without a word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    r = probe(model, torch.randn(3, 4), iters=0)
    assert [x.name for x in r.layers] == ["2", "4"]
    assert r.notes == ["not layers: modules whose parameters are all frozen (requires_grad=False): 0"]
    assert r.notes[0] in r.summary_lines()


def test_printing_a_result_shows_the_table_and_the_pasted_swap_heals_the_net():
    """print(result) showed the dataclass; the swap remedy swapped every Sigmoid (the output's too) and its
    companion lines said "for the relu that follows it" of layers a sigmoid follows."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 3), nn.Sigmoid())
    r = probe(model, torch.randn(8, 16), iters=0)
    text = str(r)
    assert "verdict vanishing" in text and "ERROR vanishing_gradient" in text and "Finding(" not in text
    assert "random-projection loss" in text  # said "loss -0.0007": a loss that means nothing, unnamed
    (f,) = r.findings
    assert not any("relu that follows it" in m.action for m in f.remedies)
    assert not any("saturated fraction up to 0%" in c for c in f.causes)
    exec(f.remedies[0].code, {"gw": gw, "nn": nn, "torch": torch, "model": model})  # pasted as printed
    assert isinstance(model[13], nn.Sigmoid) and isinstance(model[1], nn.LeakyReLU)
    assert probe(model, torch.randn(8, 16), iters=0).verdict == "healthy"


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_every_init_remedy_heals_a_deep_net_at_torch_s_default_init(act):
    """The plain-torch init lines named layers '0' and '2' only, each a remedy of its own: pasted, the
    20-layer net still read vanishing (gain 1e-8), since the other 18 layers kept the default scale."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(64, 64), act())], nn.Linear(64, 10))

    x = torch.randn(16, 64)
    (f,) = probe(net(), x, iters=0).findings
    # tanh at σ_w² = 1/3 works near 0, where tanh' ≈ 1: the weights' scale is the cause, not saturation
    assert not any("saturating" in c for c in f.causes) and f.causes[0].startswith("initial weights too small")
    inits = [m for m in f.remedies if "init" in m.code]
    assert len(inits) == 2  # gw.init_ and its plain-torch equivalent
    for remedy in inits:
        model = net()
        exec(remedy.code, {"gw": gw, "nn": nn, "torch": torch, "model": model})  # noqa: S102
        assert probe(model, x, iters=0).verdict == "healthy", remedy.code


def test_a_meta_model_and_a_cell_that_does_not_take_its_inputs_are_named():
    """"Tensor.item() cannot be called on meta tensors" and torch's "input has inconsistent input_size"."""
    from gradwatch.probe import probe_cell

    with pytest.raises(gw.ConfigError, match=r"Linear.weight is on the meta device .*\(model.to_empty"):
        probe(nn.Linear(4, 2, device="meta"), torch.randn(3, 4, device="meta"))
    with pytest.raises(gw.ConfigError, match=r"probe_cell: the cell failed on x_0 of shape \(2, 3\) \(RuntimeError"):
        probe_cell(nn.RNNCell(4, 8), torch.randn(5, 2, 3), torch.zeros(2, 8))
    with pytest.raises(gw.ConfigError, match="model=3 is not a torch.nn.Module"):
        gw.check_constant_init(3)


def test_the_swap_remedy_names_the_class_that_is_there_and_never_only_the_output_s():
    """A Hardsigmoid net was told to swap nn.Sigmoid (which swapped nothing); a net whose one sigmoid is
    the output's was told to swap it, with code that keeps it."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.Hardsigmoid())], nn.Linear(16, 1))
    x = torch.randn(8, 16)
    (f,) = probe(model, x, iters=0).findings
    assert ("swap_activations(model, nn.Hardsigmoid, lambda: nn.LeakyReLU(0.01), keep_output=True, "
            "example_input=torch.randn(8, 16))") in f.remedies[0].code
    exec(f.remedies[0].code, {"gw": gw, "nn": nn, "torch": torch, "model": model})  # noqa: S102
    assert probe(model, x, iters=0).verdict == "healthy"
    deep = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(16, 16), nn.ReLU())], nn.Linear(16, 1), nn.Sigmoid())
    (f,) = probe(deep, x, iters=0).findings
    assert not any("swap" in m.action for m in f.remedies) and "gw.init_(model)" in f.remedies[0].code


def test_an_assert_inside_torch_s_forward_is_a_bad_batch():
    """MultiheadAttention checks its input's rank with an assert: that was a bare AssertionError."""
    from test_probe_helpers import TinyAttention

    with pytest.raises(gw.ConfigError, match=r"TinyAttention failed on the probe batch \(AssertionError: query"):
        probe(TinyAttention(), torch.randint(0, 20, (2, 5, 3)))
