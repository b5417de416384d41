"""Which axis of an activation's output holds its units: a Conv1d's (N, C, L) output has its
channels at 1, a sequence's (N, T, H) from a Linear its features last. Counted over the length, a
tester's text CNN with 87.5% of its Conv1d channels dead read as none dead."""

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.collect.stats import activation_stats, unit_axis


class Conv1dNet(nn.Module):
    def __init__(self, norm: bool, residual: bool):
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.BatchNorm1d(8) if norm else nn.Identity()
        self.act, self.residual = nn.ReLU(), residual
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.norm(self.conv(x))
        h = self.act(h + x if self.residual else h)
        return self.head(h.mean(-1))


class SequenceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.act, self.head = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.act(self.proj(x)).mean(1))


def _dead_share(y: torch.Tensor, axis: int) -> float:
    """The share of units along `axis` whose output is 0 for every sample and position."""
    other = tuple(d for d in range(y.dim()) if d != axis)
    return (y.abs().amax(dim=other) == 0).float().mean().item()


@pytest.mark.parametrize("norm, residual", [(False, False), (True, False), (False, True)])
def test_conv1d_channels_are_its_units(norm, residual):
    torch.manual_seed(0)
    model = Conv1dNet(norm, residual)
    with torch.no_grad():
        bias = model.norm.bias if norm else model.conv.bias
        bias[0], bias[1:] = 1.0, -100.0  # 7 of 8 channels below 0 everywhere
    x = torch.randn(32, 8, 20).abs() * 0.01  # (N, C, L); small, so a residual keeps them below 0
    seen = []
    model.act.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with gw.watch(model, sample_every=1, warn=False) as watch:
        model(x).sum().backward()
        run = watch.series()
    assert unit_axis(model.norm(model.conv(x))) == 1
    assert _dead_share(seen[0], 1) == pytest.approx(7 / 8)
    assert run.metrics["dead"][0, run.column("act")] == pytest.approx(7 / 8)


def test_a_causal_conv1d_chomped_to_its_length_keeps_its_channels_as_units():
    """A TCN's chomp `x[:, :, :-pad]` ended the walk up the graph: 75% dead channels read as none."""
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 8, 3, padding=2)
    with torch.no_grad():
        conv.bias[2:] = -100.0
    x = torch.randn(16, 4, 20, requires_grad=True)
    y = torch.relu(conv(x)[:, :, :-2].contiguous())  # causal: the chomp, then the activation
    assert unit_axis(y) == 1 and activation_stats(y.detach(), "relu", 1)[3].item() == pytest.approx(6 / 8)
    assert unit_axis(torch.relu(conv(x)[:, 2:, :])) == 1  # a slice of the channels moves no axis either
    gate, _ = conv(x).chunk(2, dim=1)  # a WaveNet gate's half (a reviewer's: read as no channel dead)
    assert unit_axis(torch.relu(gate)) == 1


def test_a_sequences_features_are_its_units():
    torch.manual_seed(0)
    model = SequenceNet()
    with torch.no_grad():
        model.proj.bias[:2] = -100.0  # 2 of 8 features
    x = torch.randn(32, 20, 8)  # (N, T, H)
    y = model.act(model.proj(x))
    assert unit_axis(y) == 2 and _dead_share(y.detach(), 2) == pytest.approx(2 / 8)
    with gw.watch(model, sample_every=1, warn=False) as watch:
        model(x).sum().backward()
        run = watch.series()
    assert run.metrics["dead"][0, run.column("act")] == pytest.approx(2 / 8)
    assert activation_stats(y.detach(), "relu")[3].item() == pytest.approx(2 / 8)  # no graph: features last


def test_a_sparse_embedding_is_noted_and_no_adam_is_advised():
    """Adam refuses sparse gradients: a tester's text CNN with nn.Embedding(sparse=True) under SGD was
    told `optimizer = torch.optim.Adam(...)`, which raised when pasted."""
    import numpy as np

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Flatten(), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)  # too small to move the loss: a plateau
    with gw.watch(model, opt, warn=False) as watch:
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.randint(0, 50, (16, 4))), torch.randint(0, 2, (16,))).backward()
            opt.step()
        run = watch.series()
    assert run.meta["sparse_gradients"] is True
    run.loss[:] = 0.69 + 0.001 * np.random.default_rng(0).random(len(run.loss))
    (plateau,) = [f for f in gw.diagnose(run) if f.kind == "loss_plateau"]
    assert not any("Adam" in r.code for r in plateau.remedies)
    del run.meta["sparse_gradients"]
    (plateau,) = [f for f in gw.diagnose(run) if f.kind == "loss_plateau"]
    assert any("Adam" in r.code for r in plateau.remedies)


def test_a_parametrized_layer_is_one_layer_holding_its_originals():
    """weight_norm / spectral_norm: the ParametrizationList holding the originals stood as a layer of
    its own before the Linear, left with its bias alone: two layers of the depth profile for one."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(8, 16)), nn.ReLU(),
                          parametrizations.spectral_norm(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(model, opt, sample_every=1, warn=False) as watch:
        opt.zero_grad()
        model(torch.randn(32, 8)).pow(2).mean().backward()
        expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model[0].parameters()])).item()
        opt.step()
        run = watch.series()
    assert [l.name for l in run.layers] == ["0", "1", "2", "3", "4"]
    assert run.layers[0].n_params == sum(p.numel() for p in model[0].parameters())  # g, v and the bias
    assert run.metrics["grad_norm"][0, run.column("0")] == pytest.approx(expected, rel=1e-5)


def test_a_parametrized_weight_of_a_models_root_stays_a_layer():
    """A hand-written RNN whose W_hh, a bare parameter of the model, is parametrized orthogonal: its
    original was claimed for the root, which builds one layer per weight of its own, and dropped."""
    from torch.nn.utils import parametrizations

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.W_hh = nn.Parameter(torch.randn(8, 8) / 3)
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            h = torch.zeros(x.shape[0], 8)
            for t in range(x.shape[1]):
                h = torch.tanh(x[:, t] + h @ self.W_hh)
            return self.head(h)

    torch.manual_seed(0)
    net = parametrizations.orthogonal(Net(), "W_hh")
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with gw.watch(net, opt, sample_every=1, warn=False) as watch:
        opt.zero_grad()
        net(torch.randn(4, 5, 8)).sum().backward()
        opt.step()
        run = watch.series()
    held = {id(p) for l in watch._layers for p in l.params}
    assert all(id(p) in held for p in net.parameters())  # every trainable weight in some layer
