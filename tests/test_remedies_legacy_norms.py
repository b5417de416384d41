"""gw.init_ on the older torch.nn.utils.weight_norm and spectral_norm, whose weight is a plain tensor a
hook recomputes before every forward (from weight_g and weight_v, or weight_orig): the draw must land
in those."""

import math
import warnings

import pytest
import torch
from torch import nn

import gradwatch as gw


def legacy_mlp() -> nn.Sequential:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, still in many audio/vocoder models
        return nn.Sequential(nn.utils.weight_norm(nn.Linear(400, 300)), nn.ReLU(),
                             nn.utils.weight_norm(nn.Linear(300, 10), dim=None))


@pytest.mark.parametrize("forward_first", ["none", "no_grad"])
def test_legacy_weight_norm_gets_the_draw_the_forward_uses(forward_first):
    """Before, a weight computed under no_grad (init_'s own example forward, an eval loop) looked frozen
    and was left alone; one computed with grad was copied into and recomputed from g, v at the next
    forward, while the report claimed it was set."""
    torch.manual_seed(0)
    model, x = legacy_mlp(), torch.randn(8, 400)
    if forward_first == "no_grad":
        with torch.no_grad():
            model(x)
    report = gw.init_(model, example_input=x)
    assert [r.name for r in report] == ["0.weight", "2.weight"]
    assert not any("frozen" in n for n in report.notes)
    model(x)  # the hook recomputes each weight from g and v
    he = math.sqrt(2 / 400)  # kaiming_normal_, fan_in 400
    xavier = math.sqrt(2 / (300 + 10))
    assert float(model[0].weight.std()) == pytest.approx(he, rel=0.02)
    assert float(model[2].weight.std()) == pytest.approx(xavier, rel=0.1)  # 3000 draws
    g, v = model[0].weight_g, model[0].weight_v
    torch.testing.assert_close(model[0].weight, v * (g / v.norm(dim=1, keepdim=True)))
    assert g.requires_grad and v.requires_grad


def test_frozen_legacy_weight_norm_is_still_left_alone():
    model = legacy_mlp()
    model[0].weight_g.requires_grad_(False)
    model[0].weight_v.requires_grad_(False)
    before = model[0].weight_v.clone()
    report = gw.init_(model, example_input=torch.randn(2, 400))
    assert torch.equal(model[0].weight_v, before)
    assert any(n.startswith("0.weight: left alone: frozen") for n in report.notes)


def test_legacy_spectral_norm_gets_the_draw_in_weight_orig():
    """torch.nn.utils.spectral_norm (SNGAN/BigGAN discriminators): the forward uses weight_orig / σmax(weight_orig),
    so the draw goes into weight_orig, its u, v are brought to the new σmax, and the notes say the scale is fixed."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(64, 128)), nn.LeakyReLU(0.2), nn.Linear(128, 1))
    x = torch.randn(4, 64)
    report = gw.init_(model, example_input=x)
    sn = model[0]
    assert "0.weight" in [r.name for r in report]
    assert any(n.startswith("0.weight: set through SpectralNorm") for n in report.notes)
    gain = math.sqrt(2 / (1 + 0.2**2))
    assert float(sn.weight_orig.std()) == pytest.approx(gain / math.sqrt(64), rel=0.03)
    sn.eval()  # eval: no power iteration in the forward, the u, v init_ left are used
    model(x)
    want = sn.weight_orig / torch.linalg.matrix_norm(sn.weight_orig.detach(), ord=2)
    torch.testing.assert_close(sn.weight, want, rtol=1e-3, atol=1e-5)
