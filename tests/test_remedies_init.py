"""gw.init_: the scheme chosen per layer from the activation after it, measured on the weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch.errors import ConfigError
from gradwatch.remedies.init import check_constant_init, init_


def rows(report):
    return {r.name: r for r in report.rows}


def test_he_for_relu_measured_std():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 10))
    report = init_(model)
    w = model[0].weight.detach()
    assert float(w.std()) == pytest.approx(math.sqrt(2 / 1024), rel=0.05)
    r = rows(report)["0.weight"]
    assert (r.activation, r.scheme) == ("relu", "he") and r.std == pytest.approx(math.sqrt(2 / 1024))
    assert rows(report)["3.weight"].scheme == "xavier"  # nothing after the output layer
    assert float(model[0].bias.detach().abs().max()) == 0 and float(model[3].bias.detach().abs().max()) == 0


@pytest.mark.parametrize("act, slope", [(nn.LeakyReLU(0.5), 0.5), (nn.PReLU(), 0.25), (nn.PReLU(init=0.6), 0.6)])
def test_leaky_gain(act, slope):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(800, 600), act, nn.Linear(600, 2))
    report = init_(model)
    gain = math.sqrt(2 / (1 + slope ** 2))
    assert rows(report)["0.weight"].gain == pytest.approx(gain)
    assert float(model[0].weight.detach().std()) == pytest.approx(gain / math.sqrt(800), rel=0.01)


def test_xavier_for_tanh_and_sigmoid():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(700, 500), nn.Tanh(), nn.Linear(500, 400), nn.Sigmoid())
    report = init_(model)
    for i, gain, fan in [(0, 5 / 3, 700 + 500), (2, 1.0, 500 + 400)]:
        bound = gain * math.sqrt(6 / fan)  # Glorot uniform
        w = model[i].weight.detach()
        assert float(w.abs().max()) <= bound
        assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert rows(report)[f"{i}.weight"].scheme == "xavier"


def test_lecun_for_selu():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(64, 128, 3), nn.SELU(), nn.Flatten(), nn.Linear(10, 2))
    report = init_(model)
    assert rows(report)["0.weight"].scheme == "lecun"
    assert float(model[0].weight.detach().std()) == pytest.approx(1 / math.sqrt(64 * 9), rel=0.05)


def test_recurrent_orthogonal_per_gate():
    torch.manual_seed(4)
    lstm, gru = nn.LSTM(10, 32, num_layers=2), nn.GRU(10, 16)
    model = nn.ModuleDict({"lstm": lstm, "gru": gru})
    report = init_(model)
    for m, chunks, h in [(lstm, 4, 32), (gru, 3, 16)]:
        for name, p in m.named_parameters():
            if name.startswith("weight_hh"):
                for gate in p.detach().chunk(chunks, 0):
                    torch.testing.assert_close(gate @ gate.T, torch.eye(h), atol=1e-5, rtol=0)
            if name.startswith("bias"):
                assert float(p.detach().abs().max()) == 0
    r = rows(report)
    assert r["lstm.weight_hh_l1"].scheme == "orthogonal" and r["lstm.weight_ih_l0"].scheme == "xavier"
    # xavier per gate: each (32 x 10) block has the Glorot bound of its own fans
    assert float(lstm.weight_ih_l0.detach().abs().max()) <= math.sqrt(6 / (10 + 32))


def test_functional_activation_found_with_example_input():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(300, 300), nn.Linear(300, 300), nn.Linear(300, 3)

        def forward(self, x):  # no activation modules at all
            return self.c(torch.tanh(self.b(F.leaky_relu(self.a(x), 0.1))))

    torch.manual_seed(5)
    net = Net()
    blind = rows(init_(net))
    assert blind["a.weight"].scheme == "xavier"  # module order sees no activation
    seen = rows(init_(net, example_input=torch.randn(4, 300)))
    assert (seen["a.weight"].activation, seen["a.weight"].scheme) == ("leaky_relu(0.1)", "he")
    assert seen["a.weight"].gain == pytest.approx(math.sqrt(2 / 1.01))
    assert (seen["b.weight"].activation, seen["b.weight"].scheme) == ("tanh", "xavier")
    assert seen["c.weight"].activation == "linear"
    assert net.training  # the tracing forward left the mode as it was


def test_execution_order_beats_registration_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()   # registered first, runs after fc
            self.sig = nn.Sigmoid()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.sig(self.fc(x))

    r = rows(init_(Net(), example_input=torch.randn(2, 8)))
    assert r["fc.weight"].activation == "sigmoid"


def test_forced_scheme_and_table():
    model = nn.Sequential(nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 2))
    report = init_(model, "orthogonal")
    w = model[0].weight.detach()
    torch.testing.assert_close(w @ w.T, (5 / 3) ** 2 * torch.eye(20), atol=1e-4, rtol=0)
    text = str(report)
    assert "followed by" in text and "orthogonal" in text and "0.weight" in text


def test_constant_init_detected():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[2].weight.copy_(torch.tensor([1.0, 2.0, 3.0]).expand(2, 3))
    found = check_constant_init(model)
    assert len(found) == 2
    assert found[0].startswith("0.weight is all 0") and "identical weights" in found[1]
    report = init_(model)
    assert report.constant_before == found and "was constant" in str(report)
    assert check_constant_init(model) == []


def test_bad_input():
    with pytest.raises(ConfigError, match="scheme='kaiming'"):
        init_(nn.Linear(2, 2), "kaiming")
    with pytest.raises(ConfigError, match="model='m' is not a torch.nn.Module"):
        init_("m")
    with pytest.raises(ConfigError, match="no Linear, Conv or recurrent layer"):
        init_(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    with pytest.raises(ConfigError, match="example_input could not run"):
        init_(nn.Linear(3, 2), example_input=torch.randn(2, 5))
