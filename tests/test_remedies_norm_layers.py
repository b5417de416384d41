"""gw.modify.insert_norm after the layers users have beyond Linear and Conv2d: a transposed-conv
decoder (DCGAN's ConvTranspose2d -> BatchNorm2d -> ReLU), nn.Bilinear; and a layer it cannot
normalise, which must leave the model as it was, not half changed."""

import copy

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.errors import ConfigError


def decoder() -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(8, 6, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(6, 4, 4, 2, 1),
                         nn.ReLU(), nn.ConvTranspose2d(4, 3, 3, 1, 1), nn.Tanh())


@pytest.mark.parametrize("kind, norm", [("batch", nn.BatchNorm2d), ("layer", nn.GroupNorm)])
def test_transposed_conv_decoder_gets_channel_norms(kind, norm):
    torch.manual_seed(0)
    model, z = decoder(), torch.randn(4, 8, 3, 3)
    ref = copy.deepcopy(model)
    model, change = gw.modify.insert_norm(model, kind=kind, after=(nn.ConvTranspose2d,))
    assert change.modules == ["0", "2"]  # not the output layer
    made = [model._modules[k] for k in (f"0_{kind[0]}n", f"2_{kind[0]}n")]
    assert all(isinstance(m, norm) for m in made)
    # the same as writing the norms by hand with torch (fresh: weight 1, bias 0; train mode)
    hand = [norm(6) if kind == "batch" else norm(1, 6), norm(4) if kind == "batch" else norm(1, 4)]
    expected = nn.Sequential(ref[0], hand[0], ref[1], ref[2], hand[1], *ref[3:])
    torch.testing.assert_close(model(z), expected(z))


def test_bilinear_gets_a_feature_norm():

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.bil, self.act, self.out = nn.Bilinear(5, 5, 7), nn.Tanh(), nn.Linear(7, 2)

        def forward(self, a, b):
            return self.out(self.act(self.bil(a, b)))

    model, change = gw.modify.insert_norm(Pair(), kind="layer", after=(nn.Bilinear, nn.Linear))
    assert change.modules == ["bil"] and isinstance(model.bil[1], nn.LayerNorm)
    h = model.bil(torch.randn(3, 5), torch.randn(3, 5))
    torch.testing.assert_close(h.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)


def test_a_layer_without_a_known_layout_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Embedding(8, 8), nn.Linear(8, 2))
    before = dict(model.named_modules())
    with pytest.raises(ConfigError, match="Embedding"):
        gw.modify.insert_norm(model, after=(nn.Linear, nn.Embedding))
    assert dict(model.named_modules()) == before  # the first Linear got no norm before the error
