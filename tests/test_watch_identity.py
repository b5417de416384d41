"""Watching changes nothing: losses and final weights are bit-identical with and without watch."""

import pytest
import torch

from models import FAMILIES, train


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("family", FAMILIES)
def test_watch_is_bit_identical(family, optimizer):
    ref_losses, ref_model, _ = train(family, optimizer, steps=6)
    # sample_every=2 exercises both plain and sampled steps (activation/output/time hooks).
    losses, model, watch = train(family, optimizer, steps=6, watch_kwargs={"sample_every": 2})
    assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses))
    for (name, p), (_, q) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(p, q), name
    assert len(watch.series().steps) == 6


def test_detach_leaves_no_hook():
    import gradwatch

    losses, model, watch = train("lstm", "sgd", steps=3, watch_kwargs={"sample_every": 1})
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert torch.autograd.backward.__module__ == "torch.autograd"
    assert torch.amp.GradScaler.scale.__qualname__ == "GradScaler.scale"
