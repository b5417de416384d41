"""gw.modify: activation swaps, norm insertion, residual wrapping, RNN -> GRU keep shapes and untouched names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch.errors import ConfigError
from gradwatch.remedies.modify import Residual, add_residual, insert_norm, replace_rnn, swap_activations


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 3))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, padding=1)
        self.act = nn.Sigmoid()
        self.head = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).flatten(1))


def names(model):
    return {n: p for n, p in model.named_parameters()}


def test_swap_activations():
    model = mlp()
    x = torch.randn(4, 6)
    before = names(model)
    out, change = swap_activations(model)
    assert out is model and change.modules == ["1", "3"]
    assert all(isinstance(model[i], nn.LeakyReLU) and model[i].negative_slope == 0.01 for i in (1, 3))
    assert names(model).keys() == before.keys() and all(names(model)[k] is before[k] for k in before)
    assert model(x).shape == (4, 3)
    h = model[0](x)
    torch.testing.assert_close(model[1](h), torch.where(h > 0, h, 0.01 * h))
    copy_model, change2 = swap_activations(model, old=nn.LeakyReLU, new=nn.ReLU, inplace=False)
    assert isinstance(copy_model[1], nn.ReLU) and isinstance(model[1], nn.LeakyReLU) and change2
    assert "nothing changed" in str(swap_activations(model, old=nn.Tanh)[1])


def test_insert_norm_says_plainly_why_nothing_changed():
    """It said "no layer of type (<class 'torch.nn.modules.linear.Linear'>, ...)", also of a model
    whose only Linear is the output layer it keeps."""
    assert str(insert_norm(nn.Sequential(nn.ReLU()))[1]) == "no Linear or conv layer to normalise; nothing changed"
    change = insert_norm(nn.Sequential(nn.Linear(3, 2)))[1]
    assert not change and "but the last, '0' (skip_last=True keeps the output layer" in str(change)


class _HeadFirst(nn.Module):
    """The output layer declared before the hidden ones, and a second head: registration order
    takes `out` for the last layer to run and `fc2` for the output."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(8, 3)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 8)
        self.value = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))

    def forward(self, x):
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.out(h).flatten(1), self.value(h) * 2


def test_insert_norm_keeps_every_output_layer_the_forward_pass_shows():
    """A tester's model with the output layer declared first got a BatchNorm on its logits and none
    after its last hidden layer: with an example batch, the layers whose output reaches the model's
    output through no other Linear are the output layers, every head's."""
    x = torch.randn(5, 4)
    model, change = insert_norm(_HeadFirst(), "batch", example_input=x)
    assert change.modules == ["fc1", "fc2", "value.0"]
    assert type(model.out) is nn.Linear and [type(m).__name__ for m in model.value][2:] == ["ReLU", "Linear"]
    assert "BatchNorm" in type(model.value[1]).__name__ and "BatchNorm" in type(model.fc2[1]).__name__
    unseen, change = insert_norm(_HeadFirst(), "batch")  # registration order: the last registered kept
    assert change.modules == ["out", "fc1", "fc2", "value.0"]
    change = insert_norm(nn.Sequential(nn.Linear(3, 2)), example_input=torch.randn(2, 3))[1]
    assert not change and "but the output layer, '0' (skip_last=True" in str(change)


def test_insert_norm_narrowed_to_convs_still_normalises_the_last_conv_and_refuses_unknown_types():
    """after=(nn.Conv2d,) left the last conv without a norm, taken for the output layer though a
    Linear follows it; after=(nn.Embedding,) said "nothing changed" of a model whose only Embedding
    was its first layer, where an unknown layout is documented as a ConfigError."""
    def net():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(2, 1, 8, 8)
    for example in (None, x):
        model, change = insert_norm(net(), after=(nn.Conv2d,), example_input=example)
        assert change.modules == ["0", "2"], example
        assert model(x).shape == (2, 3)
    for wrong in (nn.Embedding, nn.ReLU):
        with pytest.raises(ConfigError, match=f"after={wrong.__name__}: insert_norm knows the output layout"):
            insert_norm(nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 2)), after=(wrong,))


def test_swap_reaches_every_place_of_a_shared_activation():
    act = nn.Sigmoid()
    model = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 2))
    _, change = swap_activations(model)
    assert change.modules == ["1", "3"] and not any(isinstance(m, nn.Sigmoid) for m in model)


def test_batchnorm_after_a_linear_normalises_its_features_on_sequences():
    """A Linear applied to (batch, time, features): the norm is per feature over batch and time,
    as nn.BatchNorm1d on the flattened (batch·time, features) input."""
    torch.manual_seed(0)
    model, _ = insert_norm(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)), "batch")
    x = torch.randn(3, 5, 4)
    h = model[0](x)
    reference = nn.BatchNorm1d(16)
    torch.testing.assert_close(model._modules["0_bn"](h), reference(h.reshape(-1, 16)).reshape(3, 5, 16))
    torch.testing.assert_close(model._modules["0_bn"].running_var, reference.running_var)
    assert model(x).shape == (3, 5, 2)


def test_insert_batchnorm_in_sequential_keeps_every_name():
    model = mlp()
    before = names(model)
    _, change = insert_norm(model, "batch")
    assert change.modules == ["0", "2"] and change.renamed == {}  # the output layer is skipped
    assert isinstance(model._modules["0_bn"], nn.BatchNorm1d) and model._modules["0_bn"].num_features == 16
    assert list(model._modules)[:3] == ["0", "0_bn", "1"]
    after = names(model)
    assert all(after[k] is before[k] for k in before)
    assert set(change.new_parameters) == {"0_bn.weight", "0_bn.bias", "2_bn.weight", "2_bn.bias"}
    model.train()
    y = model(torch.randn(8, 6))
    assert y.shape == (8, 3)
    h = model[0](torch.randn(32, 6))
    normed = model._modules["0_bn"](h)  # BatchNorm right after the Linear: zero mean per feature
    assert float(normed.detach().mean(0).abs().max()) < 1e-5


def test_insert_norm_in_custom_module_wraps_and_reports_renames():
    model = Custom()
    x = torch.randn(3, 2, 4, 4)
    before = names(model)
    _, change = insert_norm(model, "batch", after=(nn.Conv2d, nn.Linear))
    assert isinstance(model.conv, nn.Sequential) and isinstance(model.conv[1], nn.BatchNorm2d)
    assert model.conv[1].num_features == 5
    assert change.renamed == {"conv.weight": "conv.0.weight", "conv.bias": "conv.0.bias"}
    assert names(model)["head.weight"] is before["head.weight"]  # untouched layer: same name, same tensor
    assert model(x).shape == (3, 3)
    model2 = Custom()
    insert_norm(model2, "layer", after=nn.Conv2d, skip_last=False)
    assert isinstance(model2.conv[1], nn.GroupNorm) and model2.conv[1].num_groups == 1
    model3 = mlp()
    insert_norm(model3, "layer")
    assert isinstance(model3._modules["0_ln"], nn.LayerNorm) and model3._modules["0_ln"].normalized_shape == (16,)


def test_insert_norm_leaves_attention_and_transformer_blocks_alone():
    """nn.MultiheadAttention reads out_proj.weight itself, the encoder layer's fast path
    linear1/linear2's: a norm wrapped around them broke the first forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), nn.Linear(16, 3))
    _, change = insert_norm(model, "layer")
    assert change.modules == ["0"]  # the head is skipped as the last layer, the block's Linears as fused
    x = torch.randn(2, 5, 4)
    assert model(x).shape == (2, 5, 3)
    model.eval()  # the fused fast path, which reads the block's weights directly
    with torch.no_grad():
        assert model(x).shape == (2, 5, 3)


def test_swapping_a_transformer_layers_activation_reaches_its_fast_path():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, activation=nn.GELU(), batch_first=True).eval()
    swap_activations(layer, nn.GELU, nn.SELU)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        fast = layer(x)  # the fused kernel
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = layer(x)  # the modules, SELU included
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_add_residual():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(),
                          nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), nn.Linear(8, 2))
    x = torch.randn(5, 8)
    block = model[2]
    before = names(model)
    _, change = add_residual(model, x)
    assert change.modules == ["0", "2"]  # parameterised, shape-preserving; not the ReLU or the head
    assert isinstance(model[2], Residual) and model[2].fn is block
    assert change.renamed["2.0.weight"] == "2.fn.0.weight"
    assert names(model)["3.weight"] is before["3.weight"]
    h = model[1](x + model[0].fn(x))
    torch.testing.assert_close(model[2](h), h + block(h))
    assert model(x).shape == (5, 2)


def test_add_residual_named_blocks_and_bad_input():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    _, change = add_residual(model, x, blocks=["0"])
    assert change.modules == ["0"]
    with pytest.raises(ConfigError, match="block '1' changes the shape"):
        add_residual(model, x, blocks=["1"])
    with pytest.raises(ConfigError, match="'nope'"):
        add_residual(model, x, blocks=["nope"])


def test_bad_input():
    with pytest.raises(ConfigError, match="kind='group'"):
        insert_norm(mlp(), "group")
    with pytest.raises(ConfigError, match="old="):
        swap_activations(mlp(), old="sigmoid")
    with pytest.raises(ConfigError, match="not an nn.Module"):
        swap_activations(mlp(), new=lambda: "relu")


class SeqModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 8, num_layers=2, nonlinearity="relu", batch_first=True, bidirectional=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        out, h = self.rnn(x)
        return self.head(out[:, -1]), h


def test_replace_rnn_by_a_gru_of_the_same_shape():
    torch.manual_seed(0)
    model, x = SeqModel(), torch.randn(4, 5, 3)
    (y0, h0), head_w = model(x), model.head.weight
    _, change = replace_rnn(model)
    gru = model.rnn
    assert type(gru) is nn.GRU and change.modules == ["rnn"]
    assert (gru.input_size, gru.hidden_size, gru.num_layers, gru.batch_first, gru.bidirectional) == (3, 8, 2, True, True)
    y1, h1 = model(x)  # the forward that called the RNN runs unchanged
    assert y1.shape == y0.shape and h1.shape == h0.shape
    assert model.head.weight is head_w and "head.weight" in dict(model.named_parameters())
    assert set(change.new_parameters) == {n for n, _ in gru.named_parameters(prefix="rnn")}
    # the GRU is torch's own: same result as a fresh nn.GRU holding the same weights
    ref = nn.GRU(3, 8, num_layers=2, batch_first=True, bidirectional=True)
    ref.load_state_dict(gru.state_dict())
    assert torch.equal(ref(x)[0], gru(x)[0])
    assert not replace_rnn(nn.Linear(2, 2))[1]  # nothing to replace: says so
    with pytest.raises(ConfigError, match="nn.GRU"):
        replace_rnn(nn.RNN(2, 2))


def test_swap_keeps_the_output_activation_when_asked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1), nn.Sigmoid())  # BCELoss's probabilities
    _, change = swap_activations(model, nn.Sigmoid, lambda: nn.LeakyReLU(0.01), keep_output=True)
    assert change.modules == ["1"] and isinstance(model[3], nn.Sigmoid) and isinstance(model[1], nn.LeakyReLU)
    out = model(torch.randn(16, 4))
    assert ((out > 0) & (out < 1)).all()  # still probabilities
    hidden_only = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))  # no output activation: all swapped
    assert swap_activations(hidden_only, nn.Tanh, nn.ReLU, keep_output=True)[1].modules == ["1"]


class TwoHeads(nn.Module):
    """A sigmoid probability head, then a linear value head, on a sigmoid trunk whose last
    activation is flattened on its way to the heads."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 6), nn.Sigmoid())
        self.prob = nn.Sequential(nn.Linear(6, 1), nn.Sigmoid())
        self.value = nn.Linear(6, 1)

    def forward(self, x):
        h = self.trunk(x).reshape(len(x), 2, 3).flatten(1)
        return {"prob": self.prob(h), "value": self.value(h)}


def test_swap_keeps_a_heads_output_activation_when_another_head_runs_after_it():
    """The value head runs last: by call order the probability head's sigmoid came before the last
    layer and was swapped, and BCELoss raised on values outside [0, 1]. Its output reaches the
    model's output through no layer: kept. The trunk's, flattened into both heads, are swapped."""
    torch.manual_seed(0)
    model, x = TwoHeads(), torch.randn(16, 4)
    _, change = swap_activations(model, nn.Sigmoid, lambda: nn.LeakyReLU(0.01), keep_output=True, example_input=x)
    assert change.modules == ["trunk.1", "trunk.3"] and isinstance(model.prob[1], nn.Sigmoid)
    out = model(x)
    nn.functional.binary_cross_entropy(out["prob"], torch.ones(16, 1)).backward()  # still probabilities
    plain = TwoHeads()  # without keep_output, every one is swapped
    assert swap_activations(plain, nn.Sigmoid, nn.ReLU, example_input=x)[1].modules == ["trunk.1", "trunk.3", "prob.1"]


class SharedRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.RNN(4, 4, batch_first=True)
        self.dec = self.enc

    def forward(self, x):
        return self.dec(self.enc(x)[0])[0]


def test_replace_rnn_keeps_a_shared_rnn_shared():
    """Before, named_modules() listed the RNN once, under `enc`: `enc` became a GRU, `dec` stayed
    the RNN, and the model ran two different recurrences."""
    model = SharedRNN()
    _, change = replace_rnn(model)
    assert type(model.enc) is nn.GRU and model.dec is model.enc
    assert change.modules == ["enc", "dec"] and str(change).startswith("replaced 1 nn.RNN")
    assert change.new_parameters == [n for n, _ in model.enc.named_parameters(prefix="enc")]  # each once
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(model(x), model.enc(model.enc(x)[0])[0])


class TiedLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_insert_norm_reaches_every_place_of_a_shared_layer():
    """Before, a layer registered twice got its norm at its first name only: the other place
    kept the bare layer, and `self.b is self.a` no longer held."""
    torch.manual_seed(0)
    model = TiedLayers()
    linear = model.a
    _, change = insert_norm(model, "layer")
    assert change.modules == ["a", "b"] and model.b is model.a and model.a[0] is linear
    x = torch.randn(3, 8)
    norm = model.a[1]
    torch.testing.assert_close(model(x), model.head(torch.relu(norm(linear(torch.relu(norm(linear(x))))))))
    shared = nn.Linear(8, 8)
    seq = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 2))
    _, change = insert_norm(seq, "batch")
    assert change.modules == ["0", "2"] and seq._modules["0_bn"] is seq._modules["2_bn"]


def test_add_residual_reaches_every_place_of_a_shared_block():
    """Before, a block in two places was wrapped at its first only: x + f(x) there, f(x) at the other."""
    torch.manual_seed(0)
    block = nn.Linear(8, 8)
    model = nn.Sequential(block, nn.ReLU(), block, nn.Linear(8, 2))
    x = torch.randn(5, 8)
    _, change = add_residual(model, x)
    assert change.modules == ["0", "2"] and model[0] is model[2] and model[0].fn is block
    h = torch.relu(x + block(x))
    torch.testing.assert_close(model(x), model[3](h + block(h)))


def test_add_residual_leaves_norm_layers_alone():
    """Before, a stem Conv -> BatchNorm -> ReLU had its BatchNorm wrapped: x + bn(x), whose output
    (std 2.5 here, not 1) is no longer normalised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Flatten(), nn.LayerNorm(128))
    x = torch.randn(4, 3, 4, 4) * 3
    _, change = add_residual(model, x)
    assert change.modules == ["3"]  # the shape-preserving conv; no norm layer
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[4], nn.GroupNorm)
    model.train()
    out = model[1](model[0](x))
    assert float(out.std()) == pytest.approx(1.0, abs=0.05)  # still normalised


def test_swap_takes_a_module_instance_as_new_and_refuses_a_string():
    """Before, new=nn.LeakyReLU(0.1) (an instance, as one writes it in a model) failed deep inside
    torch with "forward() missing 1 required positional argument"; new='relu' with "'str' object is
    not callable". An instance is now copied for each place."""
    model = mlp()
    model, change = swap_activations(model, new=nn.LeakyReLU(0.1))
    assert change.modules == ["1", "3"] and model[1] is not model[3]
    assert all(isinstance(model[i], nn.LeakyReLU) and model[i].negative_slope == 0.1 for i in (1, 3))
    reference = mlp()
    reference[1], reference[3] = nn.LeakyReLU(0.1), nn.LeakyReLU(0.1)
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="new='relu' is not an nn.Module class, instance or factory"):
        swap_activations(mlp(), new="relu")


@pytest.mark.parametrize("modify", ["insert_norm", "replace_rnn"])
def test_the_change_tells_how_to_train_its_new_parameters(modify):
    """Before, the description said nothing of the optimizer: one built before insert_norm silently
    left every norm's weight and bias at 1 and 0, and one built before replace_rnn trained the
    discarded RNN while the GRU never moved. The advice it now gives works when pasted in."""
    torch.manual_seed(0)
    model = Custom() if modify == "insert_norm" else SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if modify == "insert_norm":
        model, change = insert_norm(model, skip_last=False)
        x = torch.randn(4, 2, 4, 4)
        exec(change.description.rpartition("add them with ")[2], {"optimizer": optimizer, "model": model,
                                                                  "change": change})
    else:
        model, change = replace_rnn(model)
        x = torch.randn(4, 5, 3)
        assert "still holds the replaced module's" in str(change) and "build the optimizer again" in str(change)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert f"lacks its {len(change.new_parameters)} new parameter(s)" in str(change)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(x)
    sum(o.square().mean() for o in (out if isinstance(out, tuple) else (out,))).backward()  # h_n: every weight
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in change.new_parameters)


class HalfFunctional(nn.Module):
    """One Sigmoid module and three functional sigmoids (torch.sigmoid, F.sigmoid, Tensor.sigmoid)."""

    def __init__(self):
        super().__init__()
        self.inp, self.act, self.mid, self.out = nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = self.act(self.mid(torch.sigmoid(self.inp(x))))
        return self.out(nn.functional.sigmoid(h) * h.sigmoid())


def test_swap_says_which_functional_activations_it_could_not_reach():
    """Before, 'replaced 1 Sigmoid module(s)' on a model whose forward also called sigmoid three
    times as a function, and 'nothing changed' with no reason on one that only did: the user was
    left believing every sigmoid was gone. The forward pass of example_input counts them."""
    x = torch.randn(4, 6)
    model, change = swap_activations(HalfFunctional(), example_input=x)
    assert change.modules == ["act"] and "(3 call(s) of sigmoid)" in str(change) and "by hand" in str(change)
    assert model(x).shape == (4, 1)
    _, change = swap_activations(HalfFunctional(), old=nn.Tanh, example_input=x)
    assert str(change) == "no Tanh module found; nothing changed"  # no tanh anywhere: nothing to say
    model = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid())
    _, change = swap_activations(model, example_input=torch.randn(2, 3))
    assert str(change) == "replaced 1 Sigmoid module(s) by LeakyReLU(negative_slope=0.01): 1"  # its own call is no functional one


def test_swapping_to_prelu_lists_its_new_parameters():
    """Before, a swap to PReLU reported no new parameters: an optimizer built before never trained its slopes."""
    model, change = swap_activations(mlp(), new=nn.PReLU)
    assert change.new_parameters == ["1.weight", "3.weight"] and "lacks its 2 new parameter(s)" in str(change)
    _, change = swap_activations(mlp(), new=nn.LeakyReLU(0.1))
    assert change.new_parameters == [] and "optimizer" not in str(change)


class Dict(nn.Module):
    """Layers in an nn.ModuleDict, called by a forward of its own: no nn.Sequential at all."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleDict({"a": nn.Linear(6, 8), "act": nn.Tanh(), "b": nn.Linear(8, 8), "c": nn.Linear(8, 1)})

    def forward(self, x):
        layer = self.layers
        return layer["c"](layer["act"](layer["b"](layer["act"](layer["a"](x)))))


def test_add_residual_outside_a_sequential_names_the_blocks_and_the_call():
    """Before, 'no shape-preserving block with parameters found' on a model whose layers.b keeps the
    shape (it is not in an nn.Sequential), and blocks='layers.b' was read letter by letter
    ("blocks contains 'l'"). Now the change names it and the call that wraps it, which works pasted."""
    x = torch.randn(4, 6)
    model, change = add_residual(Dict(), x)
    assert not change and str(change).endswith("wrap those you mean with add_residual(model, example_input, "
                                               "blocks=['layers.b'])")
    for blocks in (["layers.b"], "layers.b"):
        model, change = add_residual(Dict(), x, blocks=blocks)
        assert change.modules == ["layers.b"] and isinstance(model.layers.b, Residual)
        torch.testing.assert_close(model.layers.b(torch.ones(2, 8)), torch.ones(2, 8) + model.layers.b.fn(torch.ones(2, 8)))
    assert str(add_residual(mlp(), torch.randn(2, 6), blocks=[])[1]).endswith("nothing changed")


def test_swap_to_a_class_that_needs_arguments_and_a_functional_only_model():
    """Before, new=nn.Linear failed with a TypeError from inside the swap; and a model whose forward
    calls torch.sigmoid got 'nothing changed' with no hint that example_input would find the calls."""
    with pytest.raises(ConfigError, match=r"new=Linear could not be built with no arguments .*'in_features'"):
        swap_activations(mlp(), new=nn.Linear)
    change = swap_activations(nn.Sequential(nn.Linear(3, 3)))[1]
    assert not change and "pass example_input=<one batch> to count those calls" in str(change)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_swap_to_prelu_on_a_float64_or_bfloat16_model_runs_and_trains(dtype):
    """Before, the new PReLU was float32 and the model's next forward failed with "prelu: Type
    promoting not supported. Got Double and Float"; insert_norm already built its norms like the layer."""
    model = mlp().to(dtype)
    model, change = swap_activations(model, new=nn.PReLU)
    assert {p.dtype for p in model.parameters()} == {dtype} and change.new_parameters == ["1.weight", "3.weight"]
    x = torch.randn(4, 6, dtype=dtype)
    model(x).sum().backward()
    assert model[1].weight.grad is not None and model[1].weight.grad.dtype == dtype


def test_insert_norm_skips_layers_already_followed_by_a_norm():
    """Before, a conv -> BatchNorm2d -> ReLU block got a second BatchNorm between conv and the first
    (norm(norm(x)): new parameters and running statistics that change nothing), reported as inserted."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    model, change = insert_norm(model)
    assert change.modules == ["3"] and "(not after 0: already followed by a norm)" in str(change)
    assert [type(m).__name__ for m in model] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU",
                                                  "Flatten", "Linear"]
    model, change = insert_norm(model, kind="layer")
    assert not change and "0, 3, already followed by a norm" in str(change)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 2)


def test_a_checkpoint_saved_before_a_wrap_loads_into_the_changed_model():
    # insert_norm wraps an attribute layer as Normalised (names gain `.0`), add_residual a block as
    # Residual (names gain `.fn`): a state_dict saved before the change had "unexpected" keys for
    # every wrapped weight and left it at its fresh draw. Now only the new norm's tensors are missing.
    x = torch.randn(2, 2, 4, 4)
    model = Custom()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    normed, change = insert_norm(model, inplace=False)
    torch.nn.init.zeros_(normed.conv[0].weight)
    result = normed.load_state_dict(saved, strict=False)
    assert result.unexpected_keys == [] and "conv.1.weight" in result.missing_keys
    assert all(k.startswith("conv.1.") for k in result.missing_keys)  # the new norm's, nothing else
    assert all(torch.equal(normed.get_parameter(change.renamed.get(k, k)), v) for k, v in saved.items())

    residual, change = add_residual(mlp(), torch.randn(3, 6), blocks=["2"], inplace=False)
    plain = mlp()
    torch.nn.init.zeros_(residual[2].fn.weight)
    residual.load_state_dict(plain.state_dict())  # strict: no key missing or left over
    assert torch.equal(residual[2].fn.weight, plain[2].weight)
    residual.load_state_dict(residual.state_dict())  # its own checkpoint still loads as it is


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.a(x)))


@pytest.mark.parametrize("order", [("norm", "residual"), ("residual", "norm")])
def test_a_checkpoint_saved_before_stacked_wraps_loads(order):
    """insert_norm then add_residual wraps 'a' twice (a.0.fn.weight): each wrapper renamed only the keys
    of its inner module's own names, the outer found none, and the old weights silently did not load.
    A checkpoint saved between the two wraps loads too."""
    x = torch.randn(4, 8)
    model, saved = TwoLayers(), []
    for step in order:
        saved.append({k: v.clone() for k, v in model.state_dict().items()})
        insert_norm(model, "layer") if step == "norm" else add_residual(model, x, blocks=["a"])
    norms = [k for k, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    for checkpoint in saved:
        nn.init.zeros_(model.a.get_submodule(_linear_in(model.a)).weight)
        loaded = model.load_state_dict(checkpoint, strict=False)
        assert loaded.unexpected_keys == [], loaded
        assert all(k.rpartition(".")[0] in norms for k in loaded.missing_keys), loaded
        linear = model.a.get_submodule(_linear_in(model.a))
        old = {k: v for k, v in checkpoint.items() if k.startswith("a.") and k.endswith("weight") and v.dim() == 2}
        assert len(old) == 1 and torch.equal(linear.weight, next(iter(old.values())))
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})  # its own, strictly


def _linear_in(module: nn.Module) -> str:
    return next(n for n, m in module.named_modules() if isinstance(m, nn.Linear))


def test_a_wrapped_layer_still_answers_for_its_attributes():
    """A hand-written RNN's forward read `self.rec.out_features` of its recurrent Linear: wrapped
    with its norm, it raised AttributeError, and a tester's BatchNorm trial failed."""
    import copy

    class LoopRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.rec, self.out = nn.Linear(2, 8), nn.Linear(8, 8), nn.Linear(8, 1)

        def forward(self, x):
            h = torch.zeros(x.shape[0], self.rec.out_features)
            for t in range(x.shape[1]):
                h = torch.relu(self.inp(x[:, t]) + self.rec(h))
            return self.out(h)

    model = LoopRNN()
    weight = model.rec.weight
    insert_norm(model, "batch")
    assert isinstance(model.rec, nn.Sequential) and model.rec.out_features == 8 and model.rec.weight is weight
    assert model(torch.randn(4, 5, 2)).shape == (4, 1)
    with pytest.raises(AttributeError):
        model.rec.no_such_attribute
    copy.deepcopy(model)(torch.randn(4, 5, 2))  # (copied, as fix's trials and users do)
