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


def test_units_pinned_at_their_asymptotes_are_saturation_whatever_the_depth():
    """A tester's two tanh layers, weights x12: 66% saturated, "healthy" here, while the watch warned
    about saturation on the same model. Too shallow for the gradient's ratio across layers to show."""
    def tanh_net(scale: float) -> nn.Sequential:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
        with torch.no_grad():
            m[0].weight.mul_(scale), m[2].weight.mul_(scale)
        return m

    x = torch.rand(32, 64)  # digits-like pixels in [0, 1]
    big = gw.probe(tanh_net(12.0), x, iters=0)
    (f,) = [f for f in big.findings if f.kind == "saturation"]
    assert big.verdict == "saturated" and f.evidence["saturated"] >= 0.5
    assert set(f.layers) == {x.name for x in big.layers if x.saturated >= 0.5}
    assert f.evidence["saturated"] == max(x.saturated for x in big.layers if x.saturated == x.saturated)
    assert any("gw.init_(model)" in r.code for r in f.remedies)
    fine = gw.probe(tanh_net(1.0), x, iters=0)
    assert fine.verdict == "healthy" and not [f for f in fine.findings if f.kind == "saturation"]


def test_the_inputs_scale_is_a_cause_of_saturation_only_when_it_is_large():
    """A tester's N(0, 1) batch, made by `gradwatch probe --input-shape`, was told to standardise its
    inputs: an rms of 1 cannot saturate a fan-in layer; raw values in the hundreds can."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    with torch.no_grad():
        m[0].weight.mul_(12), m[2].weight.mul_(12)
    for x, said in ((torch.randn(32, 64), False), (torch.rand(32, 64) * 255, True)):
        (f,) = [f for f in gw.probe(m, x, iters=0).findings if f.kind == "saturation"]
        assert any("inputs on a large scale" in c for c in f.causes) is said
        assert any("Standardise" in r.action for r in f.remedies) is said


def test_the_output_layers_own_sigmoid_is_no_saturation():
    """A click-through-rate MLP, its output bias at the base rate's logit (0.8%): its sigmoid before
    BCELoss is pinned near 0 by design, and was read as saturation, with advice to re-initialise."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
    with torch.no_grad():
        m[4].bias.fill_(float(torch.logit(torch.tensor(0.008))))
    result = gw.probe(m, torch.randn(64, 16), loss_fn=lambda out: nn.functional.binary_cross_entropy(out, torch.zeros_like(out)), iters=0)
    assert result.verdict == "healthy" and not [f for f in result.findings if f.kind == "saturation"]
