"""gw.init_: the scheme chosen per layer from the activation after it, measured on the weights."""

from __future__ import annotations

import copy
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
            if name.startswith("bias"):  # zero, but the memory gate's b_ih (rows h:2h): 1
                expect = torch.zeros_like(p)
                if name.startswith("bias_ih"):
                    expect[h:2 * h] = 1.0
                assert torch.equal(p.detach(), expect)
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


def _distinct_rows_after_training(model, steps=5):
    """Train `model` a few SGD steps on random data; per weight, how many distinct units it has."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(16, 4)), torch.randint(0, 2, (16,))).backward()
        opt.step()
    return {n: len({tuple(r.tolist()) for r in p.detach().reshape(p.shape[0], -1)})
            for n, p in model.named_parameters() if p.ndim == 2}


def test_constant_init_detected():
    """Every parameter constant: the hidden units get identical gradients and stay identical (checked
    by training), the output units do not (the loss tells them apart), and only the former are listed."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    for p in model.parameters():
        nn.init.constant_(p, 0.2)
    found = check_constant_init(model)
    assert [f.split(" ")[0] for f in found] == ["0.weight", "2.weight"]
    assert found[0].startswith("0.weight is all 0.2: its 3 units compute the same output and 2 (Linear), the next "
                               "layer, reads them with identical weights")
    distinct = _distinct_rows_after_training(copy.deepcopy(model))
    assert distinct == {"0.weight": 1, "2.weight": 1, "4.weight": 2}  # what check_constant_init said
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([1.0, 2.0, 3.0]).expand(3, 3))  # identical rows, different columns
    assert [f.split(":")[0] for f in check_constant_init(model)] == ["2.weight"]
    report = init_(model)
    assert report.constant_before and "was constant" in str(report)
    assert check_constant_init(model) == []


def test_zero_output_layer_and_zero_branch_end_are_no_constant_init():
    """Zero-initialising the classifier or the last layer of a residual branch (Fixup, ControlNet's
    zero convs) is sound: the loss, or the random layer after it, gives each unit its own gradient.
    Before, all three were listed as units that "never differ", with advice to re-initialise them."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
            nn.init.zeros_(self.fc2.weight), nn.init.zeros_(self.fc2.bias)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    model = nn.Sequential(Block(), Block(), nn.Linear(4, 2))
    nn.init.zeros_(model[2].weight), nn.init.zeros_(model[2].bias)
    zero_head = check_constant_init(model)
    assert [f.split(" ")[0] for f in zero_head] == ["1.fc2.weight"]  # before a zero head: said, with its caveat
    assert "(unless a residual x + f(x) comes between)" in zero_head[0]
    torch.manual_seed(1)
    nn.init.normal_(model[2].weight)
    assert check_constant_init(model) == []
    model[2].weight.data.zero_()
    assert _distinct_rows_after_training(model) == {"0.fc1.weight": 4, "0.fc2.weight": 4, "1.fc1.weight": 4,
                                                    "1.fc2.weight": 4, "2.weight": 2}
    biased = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    for p in biased.parameters():
        nn.init.constant_(p, 0.2)
    nn.init.normal_(biased[0].bias)  # units with their own bias compute different outputs
    assert [f.split(" ")[0] for f in check_constant_init(biased)] == ["2.weight"]
    assert _distinct_rows_after_training(biased)["0.weight"] == 3


def test_bad_input():
    with pytest.raises(ConfigError, match="scheme='kaiming'"):
        init_(nn.Linear(2, 2), "kaiming")
    with pytest.raises(ConfigError, match="model='m' is not a torch.nn.Module"):
        init_("m")
    with pytest.raises(ConfigError, match="no Linear, Conv or recurrent layer"):
        init_(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    with pytest.raises(ConfigError, match="example_input could not run"):
        init_(nn.Linear(3, 2), example_input=torch.randn(2, 5))


def test_draws_are_torch_nn_inits_own():
    """He and Xavier are drawn as kaiming_normal_ and xavier_uniform_ draw them: same seed, same weights."""
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5))
    torch.manual_seed(6)
    init_(model)
    torch.manual_seed(6)
    he, xavier = nn.init.kaiming_normal_(torch.empty(20, 30), nonlinearity="relu"), nn.init.xavier_uniform_(torch.empty(5, 20))
    assert torch.equal(model[0].weight.detach(), he) and torch.equal(model[2].weight.detach(), xavier)


def weight_normed(linear):
    return nn.utils.parametrizations.weight_norm(linear)


class Halved(nn.Module):
    """weight = original / 2, with its right inverse."""

    def forward(self, x):
        return x / 2

    def right_inverse(self, w):
        return 2 * w


def halved(linear):
    return nn.utils.parametrize.register_parametrization(linear, "weight", Halved())


class Bounded(nn.Tanh):
    """weight = tanh(original): itself an activation module, but no step of the forward."""

    def right_inverse(self, w):
        return torch.atanh(w)


def bounded(linear):
    return nn.utils.parametrize.register_parametrization(linear, "weight", Bounded())


@pytest.mark.parametrize("parametrize", [weight_normed, halved, bounded])
@pytest.mark.parametrize("example", [None, torch.randn(4, 200)])
def test_parametrized_layer_initialised_through_its_parametrization(parametrize, example):
    """Before, init_ initialised `m.weight.data`, a copy the parametrization computes: the weight
    the forward uses kept its bad scale while the report claimed it done, and the layer, having
    children (its parametrizations), was taken for no step at all: "followed by linear", not relu."""
    layer = parametrize(nn.Linear(200, 200))
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(200, 1))
    torch.manual_seed(7)
    row = rows(init_(model, example_input=example))["0.weight"]
    torch.manual_seed(7)
    he = nn.init.kaiming_normal_(torch.empty(200, 200), nonlinearity="relu")
    torch.testing.assert_close(layer.weight.detach(), he)
    assert (row.activation, row.scheme) == ("relu", "he")
    assert float(layer.bias.detach().abs().max()) == 0


def test_parametrization_that_fixes_the_scale_or_cannot_be_set_is_reported():
    """spectral_norm's right_inverse keeps the draw but the forward divides it by σ; a
    parametrization without right_inverse cannot be set at all: neither is passed off as done."""
    scaled = nn.utils.parametrizations.spectral_norm(nn.Linear(50, 50))
    fixed = nn.utils.parametrize.register_parametrization(nn.Linear(50, 50), "weight", nn.Tanh())
    with torch.no_grad():
        fixed.parametrizations.weight.original.fill_(0.3)
        fixed.bias.zero_()
    model = nn.Sequential(scaled, nn.ReLU(), fixed, nn.ReLU(), nn.Linear(50, 2))
    nn.init.constant_(model[4].weight, 0.1)  # reads fixed's units alike: they stay tied
    assert check_constant_init(model) == [f"2.weight is all {math.tanh(0.3):g}: its 50 units compute the same output and 4 "
                                          "(Linear), the next layer, reads them with identical weights (unless a residual "
                                          "x + f(x) comes between), so they get the same gradient and never differ; re-initialise "
                                          "parametrizations.weight.original yourself (gw.init_ cannot set it: its "
                                          "parametrization has no right_inverse)"]
    torch.manual_seed(8)
    report = init_(model)
    torch.manual_seed(8)
    torch.testing.assert_close(scaled.parametrizations.weight.original.detach(),
                               nn.init.kaiming_normal_(torch.empty(50, 50), nonlinearity="relu"))
    assert "2.weight" not in rows(report) and float(fixed.weight.detach().std()) == 0  # left as it was
    assert [n.split(":")[0] for n in report.notes] == ["0.weight", "2.weight"]
    assert "_SpectralNorm, which fixes its scale" in report.notes[0] and "left alone" in report.notes[1]
    assert "note: 2.weight: left alone" in str(report)


def test_constant_weight_init_leaves_alone_is_not_sent_to_init():
    """Before, every constant weight came with "re-initialise (gw.init_(model))", which does not touch it."""
    embedding = nn.Embedding(3, 4)
    nn.init.zeros_(embedding.weight)
    head = nn.Linear(4, 2)
    nn.init.constant_(head.weight, 0.5)  # reads the embedding's 4 dimensions alike: they stay tied
    assert check_constant_init(nn.Sequential(embedding, head)) == [
        "0.weight is all 0: its 4 units compute the same output and 1 (Linear), the next layer, reads them with "
        "identical weights (unless a residual x + f(x) comes between), so they get the same gradient and never differ; "
        "re-initialise it yourself (gw.init_ leaves Embedding alone)"]
    nn.init.normal_(head.weight)  # a zero embedding before a random layer trains: each dimension its own gradient
    assert check_constant_init(nn.Sequential(embedding, head)) == []


def interior(out, k, dims):
    return out[(slice(None), slice(None)) + (slice(k, -k),) * dims]


@pytest.mark.parametrize("dims, groups, stride, k", [(1, 1, 1, 3), (1, 4, 2, 4), (1, 1, 3, 5), (2, 4, 1, 3),
                                                     (2, 1, 2, 4), (2, 2, 2, 3), (3, 2, 2, 2), (3, 1, 1, 3)])
def test_transposed_conv_he_keeps_the_second_moment(dims, groups, stride, k):
    """He makes E[s²] = 2·E[x²] for the layer's output s. Before, a transposed conv's fan-in was
    in·Πk: 1/groups and 1/Πstride too small a second moment (0.45 for groups=4, 0.47 for stride 2)."""
    torch.manual_seed(9)
    conv = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1](32, 32, k, stride=stride, groups=groups)
    init_(nn.Sequential(conv, nn.ReLU()))
    x = torch.randn(4, 32, *[{1: 256, 2: 24, 3: 8}[dims]] * dims)
    with torch.no_grad():
        s = interior(conv(x), k, dims)
    assert float(s.pow(2).mean() / x.pow(2).mean()) == pytest.approx(2.0, rel=0.1)


class Swishy(nn.Module):
    """An activation module from elsewhere whose class name says nothing."""

    def forward(self, x):
        return F.silu(x)


def test_functional_activation_inside_a_foreign_module():
    """Before, a functional call inside any leaf module was ignored, so a layer followed by a
    module that is only known by what it calls (F.silu here) got Xavier for "linear"."""
    model = nn.Sequential(nn.Linear(300, 300), Swishy(), nn.Linear(300, 300), nn.Softmax(-1))
    r = rows(init_(model, example_input=torch.randn(2, 300)))
    assert (r["0.weight"].activation, r["0.weight"].scheme) == ("silu", "he")
    assert r["2.weight"].activation == "softmax"


@pytest.mark.parametrize("example", [False, True])
def test_hugging_face_activation_modules(example):
    """Before, BERT's intermediate.dense, followed by Hugging Face's GELUActivation (F.gelu inside),
    got Xavier for "linear", with example_input too."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    model = transformers.BertModel(config)
    report = init_(model, example_input=(torch.randint(0, 50, (2, 6)),) if example else None)
    row = rows(report)["encoder.layer.0.intermediate.dense.weight"]
    assert (row.activation, row.scheme) == ("gelu", "he") and row.std == pytest.approx(math.sqrt(2 / 16))


@pytest.mark.parametrize("activation, expected", [("relu", "relu"), ("gelu", "gelu"), (nn.GELU(), "gelu"),
                                                  (nn.LeakyReLU(0.2), "leaky_relu(0.2)")])
def test_transformer_feedforward_without_example_input(activation, expected):
    """torch's transformer layer applies its activation between linear1 and linear2 inside forward:
    registration order alone gave linear1 'linear' and linear2 a registered GELU (He on the residual branch)."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, activation=activation)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    by_order = rows(init_(model))
    assert {n: (r.activation, r.scheme) for n, r in by_order.items()} == rows_as_run(model)
    for i in range(2):
        assert (by_order[f"layers.{i}.linear1.weight"].activation, by_order[f"layers.{i}.linear1.weight"].scheme) \
            == (expected, "he")
        assert by_order[f"layers.{i}.linear2.weight"].scheme == "xavier"


def rows_as_run(model):
    report = init_(model, example_input=torch.randn(2, 3, 16))
    return {n: (r.activation, r.scheme) for n, r in rows(report).items()}


class DownBlock(nn.Module):
    """A ResNet basic block with a downsampling shortcut: relu(bn2(conv2(...)) + down(x))."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.down(x))


def test_branch_before_a_join_is_followed_by_the_activation_after_it():
    """Before, conv2 of a downsampling block got Xavier for "linear" (std 0.083 instead of He's 0.118
    here): the shortcut's conv runs between conv2 and the relu, and call order took it for conv2's successor."""
    torch.manual_seed(0)
    model = nn.Sequential(DownBlock(8, 16), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    r = rows(init_(model, example_input=torch.randn(2, 8, 8, 8)))
    for name, fan_in in [("0.conv1.weight", 8 * 9), ("0.conv2.weight", 16 * 9), ("0.down.0.weight", 8)]:
        assert (r[name].activation, r[name].scheme) == ("relu", "he"), name
        assert r[name].std == pytest.approx(math.sqrt(2 / fan_in)), name
    assert r["2.weight"].activation == "linear"
    assert float(model[0].conv2.weight.detach().std()) == pytest.approx(math.sqrt(2 / 144), rel=0.1)


def test_frozen_layers_are_left_alone_and_named():
    """Before, init_ redrew a frozen (pretrained) backbone too: its weights were lost and could never be trained back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    model[0].requires_grad_(False)
    kept = [p.detach().clone() for p in model[0].parameters()]
    report = init_(model)
    assert all(torch.equal(a, b) for a, b in zip(kept, model[0].parameters()))
    assert set(rows(report)) == {"2.weight", "4.weight"}
    assert any(n.startswith("0: left alone: frozen") for n in report.notes) and "frozen" in str(report)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: one relu module, registered after bn3, called three times."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c // 2, 1, bias=False), nn.BatchNorm2d(c // 2)
        self.conv2, self.bn2 = nn.Conv2d(c // 2, c // 2, 3, padding=1, bias=False), nn.BatchNorm2d(c // 2)
        self.conv3, self.bn3 = nn.Conv2d(c // 2, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + x)


class Basic(nn.Module):
    """torchvision's BasicBlock: its relu registered between bn1 and conv2, called after the sum too."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


def test_resnet_blocks_without_example_input_match_the_traced_forward():
    """Registration order alone gave Bottleneck's conv1/conv2 and BasicBlock's conv2 no activation
    (Xavier, std /√2 of He's): a block's one activation module follows its normalised layers."""
    def make():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Basic(8),
                             Bottleneck(8), nn.Flatten(), nn.Linear(8 * 16, 10),
                             nn.Linear(10, 10), nn.BatchNorm1d(10))  # a head ending in a norm: linear
    traced = {n: (r.activation, r.scheme) for n, r in rows(init_(make(), example_input=torch.randn(2, 3, 4, 4))).items()}
    untraced = {n: (r.activation, r.scheme) for n, r in rows(init_(make())).items()}
    assert untraced == traced
    assert traced["4.conv1.weight"] == ("relu", "he") and traced["7.weight"] == ("linear", "xavier")


def test_post_layernorm_block_keeps_its_second_linear_linear():
    """fc2 -> residual sum -> LayerNorm: no activation follows fc2, though the block registers one."""
    class PostLN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2, self.ln = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8)

        def forward(self, x):
            return self.ln(x + self.fc2(self.act(self.fc1(x))))

    traced = {n: r.activation for n, r in rows(init_(PostLN(), example_input=torch.randn(2, 8))).items()}
    assert {n: r.activation for n, r in rows(init_(PostLN())).items()} == traced == {
        "fc1.weight": "gelu", "fc2.weight": "linear"}


class TiedPair(nn.Module):
    """Two square layers sharing one weight tensor (b.weight = a.weight), followed by relu and tanh."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(torch.tanh(self.b(F.relu(self.a(x)))))


def test_a_tied_weight_is_drawn_once_and_reported_as_it_is():
    """Before, a weight shared by two layers was drawn twice: the second draw (Xavier, for b's tanh)
    overwrote the first, yet the report still said a.weight was He with std √(2/64) = 0.177."""
    model, x = TiedPair(), torch.randn(2, 64)
    torch.manual_seed(3)
    report = init_(model, example_input=x)
    assert model.a.weight is model.b.weight
    assert [r.name for r in report.rows] == ["a.weight", "out.weight"]
    torch.manual_seed(3)  # the one draw is kaiming_normal_'s for a's relu, as the report says
    assert torch.equal(model.a.weight.detach(), nn.init.kaiming_normal_(torch.empty(64, 64), nonlinearity="relu"))
    assert rows(report)["a.weight"].std == pytest.approx(math.sqrt(2 / 64))
    assert any("b.weight is tied to a.weight" in n and "followed by tanh, which would want xavier" in n
               for n in report.notes)


def test_a_layer_tied_to_an_embedding_says_the_draw_sets_the_embedding():
    emb, head = nn.Embedding(20, 8), nn.Linear(8, 20, bias=False)
    head.weight = emb.weight
    report = init_(nn.Sequential(emb, head))
    assert [r.name for r in report.rows] == ["1.weight"]
    assert report.notes == ["1.weight is tied to 0.weight (one tensor): the draw for 1 sets 0.weight too"]


def test_a_frozen_weight_in_a_trained_layer_is_left_alone():
    """Before, only layers frozen whole were left alone: a frozen pretrained weight beside a trained
    bias (or a frozen W_hh in an LSTM) was drawn again and its pretrained values lost for good."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    lstm = nn.LSTM(4, 4)
    model[0].weight.requires_grad_(False)
    lstm.weight_hh_l0.requires_grad_(False)
    kept, kept_hh = model[0].weight.detach().clone(), lstm.weight_hh_l0.detach().clone()
    report, lstm_report = init_(model), init_(lstm)
    assert torch.equal(model[0].weight, kept) and torch.equal(lstm.weight_hh_l0, kept_hh)
    assert [r.name for r in report.rows] == ["2.weight"] and [r.name for r in lstm_report.rows] == ["weight_ih_l0"]
    assert float(model[0].bias.detach().abs().max()) == 0  # the trained bias is initialised as usual
    assert report.notes == ["0.weight: left alone: frozen (requires_grad=False) while the rest of 0 trains, so a new "
                            "draw could never be trained; unfreeze it first to initialise it"]
    assert "weight_hh_l0: left alone: frozen" in lstm_report.notes[0] and "rest of LSTM trains" in lstm_report.notes[0]


def test_a_forward_with_functional_activations_and_no_example_input_is_noted():
    """A CNN whose forward calls F.relu has no activation module: without example_input every layer got
    Xavier for "linear", silently; with it, He for the relu its forward applies."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))

    report = init_(Net())
    assert [r.scheme for r in report.rows] == ["xavier"] * 3
    assert any("pass example_input=" in n for n in report.notes) and "note: no activation module" in str(report)
    report = init_(Net(), example_input=torch.randn(2, 3, 8, 8))
    assert [r.scheme for r in report.rows] == ["he", "he", "xavier"] and not report.notes
    assert not init_(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))).notes


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_memory_gate_opened_as_the_probe_advises_and_the_gradient_reaches_back(kind):
    """Before, init_ zeroed every bias: the LSTM's forget gate (the GRU's update gate) sat at σ(0) = 1/2,
    the state and its gradient halved every step, and gw.probe on the freshly initialised cell advised the
    bias of 1 that init_ had just taken away. Measured: over 40 steps the gradient reaching the first
    input, relative to the last, is 1e3 (GRU) to 7e4 (LSTM) times larger with the gate open (Gers et al.
    2000; Jozefowicz et al. 2015)."""
    from gradwatch.probe.recurrent import gate_bias

    def reach(open_gate: bool) -> float:
        torch.manual_seed(0)
        cell = kind(8, 32, batch_first=True)
        report = init_(cell)
        assert report.memory_gates == ["bias_ih_l0"] and "memory gates (LSTM forget, GRU update) 1" in str(report)
        if not open_gate:
            with torch.no_grad():
                cell.bias_ih_l0.zero_()
        assert gate_bias(cell, 0) == (1.0 if open_gate else 0.0)  # what the probe reads
        x = torch.randn(4, 40, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        cell(x)[0][:, -1].sum().backward()
        per_step = x.grad.norm(dim=(0, 2))
        return float(per_step[0] / per_step[-1])

    assert reach(True) > 100 * reach(False)


def test_lazy_layer_needs_example_input_and_gets_he_from_it():
    # Before its first forward a LazyLinear has no weight: a ConfigError naming it, not torch's
    # ValueError from inside the draw; example_input's forward creates it, and it is initialised.
    model = nn.Sequential(nn.LazyLinear(256), nn.ReLU(), nn.Linear(256, 1))
    with pytest.raises(ConfigError, match=r"0\.weight.*example_input"):
        init_(model)
    torch.manual_seed(0)
    report = init_(model, example_input=torch.randn(2, 300))
    assert rows(report)["0.weight"].scheme == "he"
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(model[0].weight)
    assert float(model[0].weight.std()) == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)


def test_model_on_the_meta_device_is_refused_naming_the_fix():
    # Built under torch.device("meta") (shapes only, as for large models), init_ and
    # check_constant_init failed inside torch ("Tensor.item() cannot be called on meta tensors").
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    for call in (init_, check_constant_init):
        with pytest.raises(ConfigError, match=r"0\.weight.*meta device.*to_empty"):
            call(model)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    assert rows(init_(model))["0.weight"].scheme == "he"
    assert float(model[0].weight.std()) == pytest.approx(math.sqrt(2 / 64), rel=0.1)
