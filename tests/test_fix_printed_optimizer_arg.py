"""`optimizer=` on the gw.modify changes that add parameters (what `fix` prints for a combination,
pasted after the optimizer is built): the optimizer then trains what one built after the change
would, each new parameter in the group of the layer it goes with."""

import pytest
import torch
from torch import nn

import gradwatch as gw


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def _steps(model: nn.Module, opt: torch.optim.Optimizer, shape=(16, 4), n: int = 4) -> None:
    for i in range(n):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        (model(x) - x.flatten(1).sum(1, keepdim=True)).pow(2).mean().backward()
        opt.step()


def _groups(model: nn.Sequential, names: list[list[str]], lrs: list[float]) -> list[dict]:
    params = dict(model.named_parameters())
    return [{"params": [params[n] for n in group], "lr": lr} for group, lr in zip(names, lrs)]


def test_norms_join_their_layers_groups_and_train_as_an_optimizer_built_after_the_change():
    lrs = [0.3, 0.01, 0.1]
    layers = [["0.weight", "0.bias"], ["2.weight", "2.bias"], ["4.weight", "4.bias"]]
    given = _mlp()
    opt = torch.optim.SGD(_groups(given, layers, lrs), lr=0.1, momentum=0.9)
    given, change = gw.modify.insert_norm(given, "batch", optimizer=opt)
    assert "4 new parameter(s) joined the optimizer" in str(change)
    _steps(given, opt)

    built_after, _ = gw.modify.insert_norm(_mlp(), "batch")  # the reference: the optimizer built on the changed model
    with_norms = [layers[0] + ["0_bn.weight", "0_bn.bias"], layers[1] + ["2_bn.weight", "2_bn.bias"], layers[2]]
    reference = torch.optim.SGD(_groups(built_after, with_norms, lrs), lr=0.1, momentum=0.9)
    _steps(built_after, reference)
    a, b = given.state_dict(), built_after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (a["0_bn.weight"] != 1).any()  # trained


def test_a_norm_after_a_layer_no_optimizer_holds_joins_none():
    model = _mlp()
    head = torch.optim.SGD(model[4].parameters(), lr=0.1)
    model, change = gw.modify.insert_norm(model, "batch", optimizer=[head])
    assert len(head.param_groups[0]["params"]) == 2
    assert "0 of its 4 new parameter(s) joined" in str(change) and "untrained" in str(change)


def test_a_gru_takes_the_rnns_place_in_the_optimizer_with_its_state_gone():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.RNN(4, 8, batch_first=True), nn.Linear(8, 1)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    given = Seq()
    opt = torch.optim.SGD([{"params": given.rnn.parameters(), "lr": 0.05}, {"params": given.fc.parameters()}],
                          lr=0.1, momentum=0.9)
    _steps(given, opt, (8, 5, 4), n=1)  # momentum state for the RNN's parameters
    old = list(given.rnn.parameters())
    rng = torch.get_rng_state()
    given, change = gw.modify.replace_rnn(given, optimizer=opt)
    assert "4 parameter(s) of the replaced module left it" in str(change)
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in given.rnn.parameters()]
    assert not any(p in opt.state for p in old)

    torch.manual_seed(0)  # the reference: the same steps, then a new optimizer on the changed model
    reference = Seq()
    first = torch.optim.SGD([{"params": reference.rnn.parameters(), "lr": 0.05},
                             {"params": reference.fc.parameters()}], lr=0.1, momentum=0.9)
    _steps(reference, first, (8, 5, 4), n=1)
    torch.set_rng_state(rng)  # (the GRU draws its initial weights)
    reference, _ = gw.modify.replace_rnn(reference)
    rebuilt = torch.optim.SGD([{"params": reference.rnn.parameters(), "lr": 0.05},
                               {"params": reference.fc.parameters()}], lr=0.1, momentum=0.9)
    rebuilt.state[reference.fc.weight] = {k: v.clone() for k, v in first.state[reference.fc.weight].items()}
    rebuilt.state[reference.fc.bias] = {k: v.clone() for k, v in first.state[reference.fc.bias].items()}
    _steps(given, opt, (8, 5, 4))
    _steps(reference, rebuilt, (8, 5, 4))
    for (n, a), b in zip(given.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), n


def test_a_prelu_swap_gives_its_slopes_to_the_optimizer():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, _ = gw.modify.swap_activations(model, nn.Tanh, nn.PReLU, optimizer=opt)
    assert {id(p) for p in model.parameters()} == {id(p) for p in opt.param_groups[0]["params"]}


@pytest.mark.parametrize("kwargs, match", [({"optimizer": "sgd"}, "optimizer='sgd' is not a torch optimizer"),
                                           ({"inplace": False}, "optimizer= with inplace=False")])
def test_a_bad_optimizer_argument_is_refused_before_the_model_changes(kwargs, match):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(gw.GradwatchError, match=match):
        gw.modify.insert_norm(model, "batch", **{"optimizer": opt, **kwargs})
    assert len(model) == 5 and len(opt.param_groups[0]["params"]) == 6


def _decay_split(model: nn.Module) -> list[dict]:
    """The usual split: matrices decayed, vectors (biases, norms) not."""
    named = list(model.named_parameters())
    return [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]


def test_norms_join_the_group_of_their_layers_vectors_as_a_decay_split_built_after_gives_them():
    given = _mlp()
    opt = torch.optim.AdamW(_decay_split(given), lr=0.01)
    given, _ = gw.modify.insert_norm(given, "batch", optimizer=opt)
    held = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    built_after, _ = gw.modify.insert_norm(_mlp(), "batch")
    reference = torch.optim.AdamW(_decay_split(built_after), lr=0.01)
    decay_after = {n: g["weight_decay"] for n, p in built_after.named_parameters()
                   for g in reference.param_groups if any(p is q for q in g["params"])}
    assert {n: held[id(p)] for n, p in given.named_parameters()} == decay_after
    _steps(given, opt)
    _steps(built_after, reference)
    a, b = given.state_dict(), built_after.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_layer_split_over_two_optimizers_gives_each_norm_parameter_to_one():
    """Matrices in SGD, vectors in AdamW (as Muon and AdamW split them): a norm in both stepped twice."""
    model = _mlp()
    named = list(model.named_parameters())
    matrices = torch.optim.SGD([p for _, p in named if p.dim() >= 2], lr=0.1)
    vectors = torch.optim.AdamW([p for _, p in named if p.dim() < 2], lr=0.01)
    model, _ = gw.modify.insert_norm(model, "batch", optimizer=[matrices, vectors])
    norms = [p for n, p in model.named_parameters() if "_bn" in n]
    holders = [[type(o).__name__ for o in (matrices, vectors) if any(p is q for g in o.param_groups for q in g["params"])]
               for p in norms]
    assert holders == [["AdamW"]] * 4


def test_a_norm_given_to_an_lbfgs_that_has_stepped_starts_its_history_anew():
    model = _mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        return loss
    opt.step(closure)
    model, _ = gw.modify.insert_norm(model, "batch", optimizer=opt)
    opt.step(closure)  # sized to the old flat vector, its history crashed this step
    assert (model[1].weight != 1).any()


def _bias_free() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8, bias=False), nn.Tanh(), nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 1))


def _holders(model: nn.Module, *opts: torch.optim.Optimizer) -> dict[str, list[tuple[int, int]]]:
    """Each norm parameter's (optimizer, group) places."""
    return {n: [(o, g) for o, opt in enumerate(opts) for g, group in enumerate(opt.param_groups)
                if any(p is q for q in group["params"])] for n, p in model.named_parameters() if "_bn" in n}


def test_norms_after_layers_without_bias_join_the_group_of_their_kind():
    """No layer vector to go with: the decay split's no-decay group (which an optimizer built after
    the change puts them in), not the weight's."""
    model = _bias_free()
    opt = torch.optim.AdamW(_decay_split(model), lr=0.01)
    model, _ = gw.modify.insert_norm(model, "batch", optimizer=opt)
    assert set(map(tuple, _holders(model, opt).values())) == {((0, 1),)}


class Muon(torch.optim.SGD):
    """A stand-in of that name: Muon steps matrices only (torch's raised on a vector)."""


@pytest.mark.parametrize("matrices_by, to", [(Muon, 1), (torch.optim.SGD, 0)], ids=["Muon", "SGD"])
def test_norms_of_a_bias_free_layer_go_to_its_optimizer_unless_muon_holds_it(matrices_by, to):
    """Matrices in one optimizer, the model's vectors in another: Muon's layer's norms go to the
    other (it takes 2-D parameters only); any other's stay with it (a body's optimizer beside a
    head's: the head's lr drove the body's norms)."""
    model = _bias_free()
    named = list(model.named_parameters())
    matrices = matrices_by([p for _, p in named if p.dim() >= 2], lr=0.1)
    vectors = torch.optim.AdamW([p for _, p in named if p.dim() < 2], lr=0.01)
    model, _ = gw.modify.insert_norm(model, "batch", optimizer=[matrices, vectors])
    assert set(map(tuple, _holders(model, matrices, vectors).values())) == {((to, 0),)}


def test_a_bias_free_layers_norm_joins_its_own_group_of_per_layer_lrs():
    """Its group holds that layer only: the norm's lr is the layer's, not that of another layer's
    group holding vectors."""
    model = _bias_free()
    layers = [["0.weight"], ["2.weight"], ["4.weight", "4.bias"]]
    opt = torch.optim.SGD(_groups(model, layers, [0.001, 0.01, 0.1]), lr=0.1)
    model, _ = gw.modify.insert_norm(model, "batch", optimizer=opt)
    places = _holders(model, opt)
    assert places["0_bn.weight"] == [(0, 0)] and places["2_bn.bias"] == [(0, 1)]


def test_a_gru_split_over_muon_and_adamw_puts_its_matrices_in_muon():
    """AdamW, holding the head's matrix too, came first: the GRU's matrices went there."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"rnn": nn.RNN(4, 8), "head": nn.Linear(8, 1)})
    named = dict(model.named_parameters())
    vectors = torch.optim.AdamW([p for n, p in named.items() if p.dim() < 2 or n.startswith("head")], lr=0.01)
    matrices = Muon([p for n, p in named.items() if p.dim() >= 2 and n.startswith("rnn")], lr=0.1)
    model, _ = gw.modify.replace_rnn(model, optimizer=[vectors, matrices])
    in_muon = {id(p) for g in matrices.param_groups for p in g["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in in_muon} == {"rnn.weight_ih_l0", "rnn.weight_hh_l0"}


def test_a_layer_two_optimizers_hold_whole_gives_its_norm_to_both():
    """A fine-tuning's optimizer of the whole model beside a head's, both built first: each trains
    the layer, and one built after the change on the same modules would hold its norm."""
    model = _mlp()
    whole = torch.optim.SGD(model.parameters(), lr=0.1)
    head = torch.optim.SGD(list(model[2].parameters()) + list(model[4].parameters()), lr=0.1)
    model, _ = gw.modify.insert_norm(model, "batch", optimizer=[whole, head])
    places = _holders(model, whole, head)
    assert places["0_bn.weight"] == [(0, 0)] and places["2_bn.weight"] == [(0, 0), (1, 0)]


def _blocks() -> nn.Sequential:
    """Two blocks of bias-free layers, each with a norm of its own (a vector), and a head."""
    torch.manual_seed(0)
    block = lambda: nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 8, bias=False))
    return nn.Sequential(nn.Linear(4, 8), block(), block(), nn.Linear(8, 1))


def test_a_norm_in_layer_wise_decay_groups_joins_its_blocks_no_decay_group():
    """Groups per (block, decay or not), as BEiT's and MAE's fine-tuning build them: the norms of a
    bias-free layer went to the first block's no-decay group."""
    model = _blocks()
    groups = []
    for k, block in enumerate(model):
        named = list(block.parameters())
        groups += [{"params": [p for p in named if p.dim() >= 2], "lr": 0.1 * 2 ** -k, "weight_decay": 0.05},
                   {"params": [p for p in named if p.dim() < 2], "lr": 0.1 * 2 ** -k, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups)
    model, _ = gw.modify.insert_norm(model, "layer", after=nn.Linear, optimizer=opt)
    places = _holders_of(model, opt, "_ln")
    assert places["1.1_ln.weight"] == [(0, 3)] and places["2.3_ln.bias"] == [(0, 5)]


def test_a_norm_in_groups_per_stage_joins_its_stages_group():
    """Groups per stage, no split by kind: the norms of a bias-free stage went to the head's group
    (the first holding a vector), at its lr."""
    model = _blocks()
    opt = torch.optim.SGD([{"params": list(m.parameters()), "lr": 0.1 * 2 ** -k} for k, m in enumerate(model)])
    model, _ = gw.modify.insert_norm(model, "layer", after=nn.Linear, optimizer=opt)
    places = _holders_of(model, opt, "_ln")
    assert places["1.1_ln.weight"] == [(0, 1)] and places["2.3_ln.bias"] == [(0, 2)]


def test_a_muons_layers_norms_stay_untrained_where_no_optimizer_of_the_model_holds_vectors():
    """Muon steps matrices only (it raised on them); no other optimizer held a vector before the
    change to say where vectors go: none gets them, and the change says so."""
    model = _bias_free()
    named = list(model.named_parameters())

    class SingleDeviceMuon(torch.optim.SGD):
        """A name of a common Muon."""
    muon = SingleDeviceMuon([p for n, p in named if n != "4.weight" and p.dim() >= 2], lr=0.1)
    other = torch.optim.AdamW([p for n, p in named if n == "4.weight"], lr=0.01)
    model, change = gw.modify.insert_norm(model, "batch", optimizer=[muon, other])
    assert all(not places for places in _holders(model, muon, other).values())
    assert "stay untrained" in str(change)


def _holders_of(model: nn.Module, opt: torch.optim.Optimizer, mark: str) -> dict[str, list[tuple[int, int]]]:
    return {n: [(0, g) for g, group in enumerate(opt.param_groups) if any(p is q for q in group["params"])]
            for n, p in model.named_parameters() if mark in n}
