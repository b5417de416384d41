"""Where a non-finite probe comes from: a NaN made in the forward (an attention row with every key
masked) makes every gradient before it NaN, so the first NaN gradient named the input layer and the
advice (anomaly mode) looked at backward functions only."""

import contextlib
import io

import torch
from torch import nn

import gradwatch as gw


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x, mask):
        h = self.emb(x)
        return self.head(self.mha(h, h, h, key_padding_mask=mask)[0].mean(1))


def finding(r):
    return next(f for f in r.findings if f.kind == "non_finite")


def test_a_fully_masked_sample_is_traced_to_the_attention_layer():
    torch.manual_seed(0)
    model, x = Attention(), torch.randn(3, 5, 6)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1] = True  # sample 1 attends to nothing
    r = gw.probe(model, (x, mask), iters=0)
    f = finding(r)
    assert r.verdict == "non-finite" and f.evidence["layer"] == "mha"
    assert "layer 'mha' (MultiheadAttention) makes NaN/Inf from a finite input" in f.message
    assert "key_padding_mask" in f.causes[0]
    printed = io.StringIO()
    ns = {"model": model, "torch": torch}
    exec(f.remedies[0].code, ns)  # noqa: S102  the remedy as a user pastes it
    with contextlib.redirect_stdout(printed):
        model(x, mask)
    assert printed.getvalue().splitlines()[0] == "non-finite output: mha"
    mask[1, 0] = False  # one key kept: finite
    assert gw.probe(Attention(), (x, mask), iters=0).verdict != "non-finite"


def test_a_nan_in_the_batch_is_said_to_come_with_the_batch():
    x = torch.randn(4, 6)
    x[2, 3] = float("nan")
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    f = finding(gw.probe(model, x, iters=0))
    assert "the input of layer '0' (Linear) already holds NaN/Inf" in f.message
    assert f.causes[0] == "the probe batch holds NaN/Inf"


def test_a_nan_made_by_the_backward_keeps_the_anomaly_advice():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.b(torch.sqrt(self.a(x) * 0))  # a finite forward; backward: inf · 0 = NaN

    f = finding(gw.probe(Root(), torch.randn(8, 4), iters=0))
    assert "in the gradients" in f.message
    assert f.remedies[0].code == "torch.autograd.set_detect_anomaly(True)"
