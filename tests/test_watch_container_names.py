"""Zero-code naming when the script calls the parts of a model, never the model itself."""

import torch
from torch import nn

from gradwatch.collect.auto import AutoWatch


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        self.decoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 16))


def _train(tmp_path, model, opt, steps=12):
    x = torch.randn(32, 16)
    watch = AutoWatch(str(tmp_path), warn=False, sample_every=1)
    losses = []
    try:
        for _ in range(steps):
            loss = ((model.decoder(model.encoder(x)) - x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        watch.detach()
    return watch.stored_series(), losses


def test_parts_called_one_by_one_take_the_names_of_the_model_the_optimizer_trains(tmp_path):
    """`model.encoder(x)` then `model.decoder(z)`: the layers were `0`, `2`, `decoder.0`, `decoder.2`."""
    torch.manual_seed(0)
    model = AE()
    run, losses = _train(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    names = dict(model.named_modules())
    assert run.layer_names("param") == ["encoder.0", "encoder.2", "decoder.0", "decoder.2"]
    assert [l.index for l in run.layers if l.role == "param"] == sorted(l.index for l in run.layers if l.role == "param")
    assert len(run.steps) == 12 and run.loss[0] == losses[0]
    # the first step's norm is the layer's own (the naming came before anything was stored)
    torch.manual_seed(0)
    fresh, x = AE(), torch.randn(32, 16)
    ((fresh.decoder(fresh.encoder(x)) - x) ** 2).mean().backward()
    w = names["encoder.0"]
    assert w is model.encoder[0]
    expected = torch.cat([fresh.encoder[0].weight.grad.flatten(), fresh.encoder[0].bias.grad.flatten()]).norm()
    assert abs(run.series("encoder.0", "grad_norm")[1][0] - expected.item()) < 1e-6 * expected.item()


def test_a_container_the_optimizer_trains_only_part_of_keeps_the_parts_names(tmp_path):
    """The optimizer holds the decoder only: the container is no model of this training (the
    encoder's weights, in no optimizer, are left as they are found)."""
    torch.manual_seed(0)
    model = AE()
    run, _ = _train(tmp_path, model, torch.optim.SGD(model.decoder.parameters(), lr=0.1))
    assert not any(n.startswith("encoder.") for n in run.layer_names("param"))
