"""The "saturating activations" cause of a vanishing probe says how many layers they follow: a
BERT's single tanh (its pooler) was said to scale the gradient "in every layer"."""

import torch
from torch import nn

import gradwatch as gw


def small_relu_net(last: nn.Module) -> nn.Sequential:
    """Eight ReLU layers at a tenth of He's scale (vanishing), then `last` after the final hidden one."""
    torch.manual_seed(0)
    layers = []
    for i in range(8):
        fc = nn.Linear(16, 16)
        nn.init.normal_(fc.weight, std=0.1 * (2 / 16) ** 0.5)
        layers += [fc, last if i == 7 else nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(16, 3))


def saturating_cause(model: nn.Module) -> str:
    (finding,) = [f for f in gw.probe(model, torch.randn(8, 16), iters=0).findings if f.kind == "vanishing_gradient"]
    (cause,) = [c for c in finding.causes if c.startswith("saturating activations")]
    return cause


def test_one_tanh_among_relus_is_counted():
    assert saturating_cause(small_relu_net(nn.Tanh())).endswith("φ' < 1 in 1 of 9 layers")


def test_a_sigmoid_after_every_hidden_layer_is_every_hidden_layer():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 3))
    assert "φ' < 1 in every hidden layer (sigmoid: φ' ≤ 1/4)" in saturating_cause(model)
