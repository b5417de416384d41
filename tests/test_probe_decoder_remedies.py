"""The probe's remedies on layers beyond Linear and Conv2d, pasted as a user would: a transposed-conv
generator (DCGAN without BatchNorm) and a Conv1d net. torch's fans ignore a transposed conv's stride;
insert_norm's default `after` had neither ConvTranspose2d nor Conv1d (its remedy changed nothing)."""

import math

import torch
from torch import nn

import gradwatch as gw


def generator() -> nn.Sequential:
    """DCGAN's generator without its BatchNorms: 64 -> 256x4x4 -> ... -> 3x128x128, channels halving."""
    chans = [256, 128, 64, 32, 16]
    layers = [nn.Unflatten(1, (64, 1, 1)), nn.ConvTranspose2d(64, 256, 4, 1, 0), nn.ReLU()]
    for a, b in zip(chans, chans[1:]):
        layers += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.ReLU()]
    return nn.Sequential(*layers, nn.ConvTranspose2d(16, 3, 4, 2, 1), nn.Tanh())


def paste(code: str, model: nn.Module) -> nn.Module:
    ns = {"model": model, "gw": gw, "nn": nn, "torch": torch}
    exec(code, ns)  # noqa: S102  the remedy as a user pastes it
    return ns["model"]


def remedies(model: nn.Module, x: torch.Tensor) -> list[str]:
    r = gw.probe(model, x, iters=0)
    assert r.verdict == "vanishing"
    return [rem.code for f in r.findings if f.kind == "vanishing_gradient" for rem in f.remedies]


def test_plain_torch_init_of_transposed_convs_uses_their_true_fan_in():
    """Each output of ConvTranspose2d(in, out, 4, stride 2) sums in·16/4 terms: He std √2/√(4·in),
    what gw.init_ draws; torch's kaiming_normal_ reads out·16 (√2 too small a layer when out = in/2)."""
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    code = next(c for c in remedies(generator(), x) if "nn.init." in c)
    model = paste(code, generator())
    convs = [m for m in model if isinstance(m, nn.ConvTranspose2d)]
    for m in convs[:-1]:  # followed by ReLU
        fan_in = m.in_channels * 16 / math.prod(m.stride)
        assert abs(float(m.weight.std()) / (math.sqrt(2 / fan_in)) - 1) < 0.05, m
    last = convs[-1]  # tanh: Xavier with the true fans, gain 5/3
    want = 5 / 3 * math.sqrt(2 / (16 * 16 / 4 + 3 * 16))
    assert abs(float(last.weight.std()) / want - 1) < 0.1
    r = gw.probe(model, x, iters=0)
    stds = [l.act_std for l in r.layers]
    assert r.verdict == "healthy" and stds[-2] > 0.5 * stds[0]  # kaiming_normal_ read 0.17


def test_the_insert_norm_remedy_normalises_transposed_and_1d_convs():
    torch.manual_seed(0)
    code = next(c for c in remedies(generator(), torch.randn(8, 64)) if "insert_norm" in c)
    model = paste(code, generator())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model) == 5  # after all but the output layer
    conv1d = nn.Sequential(*[m for _ in range(12) for m in (nn.Conv1d(8, 8, 3, padding=1), nn.Sigmoid())],
                           nn.Flatten(), nn.Linear(8 * 20, 2))
    code = next(c for c in remedies(conv1d, torch.randn(4, 8, 20)) if "insert_norm" in c)
    before = len(list(conv1d.modules()))
    model = paste(code, conv1d)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 12 and len(list(model.modules())) > before
