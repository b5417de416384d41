"""A BatchNorm net trained in eval mode (model.eval() left on): its BatchNorm layers apply their
running statistics and normalise nothing, the gradient vanishes and units die; model.train() is the
first remedy, not a new init."""

import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose.thresholds import Thresholds


def _net(blocks: int = 10) -> nn.Sequential:
    layers = [nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU()]
    for _ in range(blocks - 1):
        layers += [nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 4))


def _train(eval_mode: bool, steps: int = 16):
    torch.manual_seed(0)
    x, y = torch.randn(256, 32), torch.randint(0, 4, (256,))
    model = _net()
    if eval_mode:
        model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watch = gw.watch(model, opt, warn=False, sample_every=5)
    for i in range(steps):
        b = slice(64 * (i % 4), 64 * (i % 4 + 1))
        loss = nn.functional.cross_entropy(model(x[b]), y[b])
        opt.zero_grad(), loss.backward(), opt.step()
    found = watch.findings()
    watch.detach()
    return found


def test_the_premise_a_standardised_input_gives_relu_a_spread_far_above_the_bar():
    """In training mode, at its initial weights, BatchNorm's output per channel has mean 0 and
    variance 1 for any input well above its eps (std > sqrt(1e-5) ~ 3e-3); ReLU of it spreads
    ~0.58 (relu of N(0, 1))."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(64)
    for scale in (1e-2, 1.0, 1e3):
        out = torch.relu(bn(scale * torch.randn(64, 64)))
        assert out.std().item() > 5 * Thresholds().batchnorm_output_std
    bn.eval()  # running statistics: the input passes through
    assert torch.relu(bn(1e-2 * torch.randn(64, 64))).std().item() < Thresholds().batchnorm_output_std


def test_a_batchnorm_net_in_eval_mode_is_told_to_train_in_training_mode():
    found = [f for f in _train(eval_mode=True) if f.kind in ("vanishing_gradient", "dead_units")]
    assert found
    for f in found:
        assert f.causes[0].startswith("eval mode:") and f.remedies[0].code.startswith("model.train()")
        assert "model.train()" in f.message
    assert not any(c.startswith("eval mode") for f in _train(eval_mode=False) for c in f.causes)
