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

    assert not any("instead of nn.RNN" in c for c in remedies("GRUCell"))
    assert any("instead of nn.RNN" in c for c in remedies("RNN"))
    torch.manual_seed(0)
    deep = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(32, 32), nn.Sigmoid())], nn.Linear(32, 2))
    r = probe(deep, torch.randn(16, 32), iters=0)
    causes = [c for f in r.findings for c in f.causes]
    assert any(c.startswith("initial weights too small") for c in causes) and not any("nan" in c for c in causes)


@pytest.mark.parametrize("bad,match", [
    (dict(iters=-1), "iters must be a non-negative integer"),
    (dict(loss_fn=lambda out: out), "loss_fn must return a scalar"),
    (dict(loss_fn=3), "loss_fn must be a function"),
    (dict(batch=torch.randn(4, 5)), r"Linear failed on the probe batch \(RuntimeError: mat1 and mat2"),
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
