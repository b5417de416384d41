"""Weights the depth profile leaves out (an embedding, a norm layer) that no optimizer steps: an
nn.Embedding(sparse=True) whose SparseAdam is built but never stepped trains nothing, beside a
dense part that learns; it is the no-optimizer warning, as for a Linear layer."""

import numpy as np
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose
from gradwatch.store.series import LayerInfo
from series_builder import build, sampled


def _with_embedding(moves: bool, outside: bool):
    run = build(n_steps=100, optimizer="Adam", lr=1e-3)
    run.layers.insert(0, LayerInfo("emb", "Embedding", -1, "param", 1000))
    for name, m in run.metrics.items():
        run.metrics[name] = np.concatenate([np.full((len(run.steps), 1), np.nan), m], axis=1)
    rows = sampled(run)
    run.metrics["grad_norm"][:, 0] = 0.01
    run.metrics["weight_norm"][rows, 0] = 30.0
    run.metrics["update_ratio"][rows, 0] = 1e-4 if moves else 0.0
    run.meta["outside_optimizers"] = ["emb"] if outside else []
    return run


def _said(found) -> list:
    return [f for f in found if f.kind == "stalled_layers" and "emb" in f.layers]


def test_an_embedding_in_no_optimizer_that_never_moves_is_the_no_optimizer_warning():
    (f,) = _said(diagnose(_with_embedding(moves=False, outside=True)))
    assert f.severity == "warning" and f.message.startswith("The weights of emb get gradients but no optimizer")
    assert _said(diagnose(_with_embedding(moves=True, outside=False))) == []  # stepped: nothing
    assert _said(diagnose(_with_embedding(moves=False, outside=False))) == []  # not said outside: the profile's rules


class _Recommender(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(500, 16, sparse=True)
        self.head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def _train(step_sparse: bool):
    torch.manual_seed(0)
    model, target = _Recommender(), torch.randn(500)
    sparse, dense = torch.optim.SparseAdam(model.emb.parameters(), lr=1e-2), torch.optim.Adam(model.head.parameters(), lr=1e-3)
    watch = gw.watch(model, dense, warn=False)
    for _ in range(40):
        ids = torch.randint(0, 500, (64, 5))
        loss = nn.functional.mse_loss(model(ids), target[ids].mean(1, keepdim=True))
        sparse.zero_grad(), dense.zero_grad(), loss.backward()
        if step_sparse:
            sparse.step()
        dense.step()
    found = watch.findings()
    watch.detach()
    return found


def test_a_sparse_embedding_whose_optimizer_never_steps_is_told_and_one_stepped_is_not():
    assert [f.severity for f in _said(_train(step_sparse=False))] == ["warning"]
    assert [f for f in _train(step_sparse=True) if f.severity != "info"] == []


def test_the_remedy_code_adds_the_embedding_to_training_sparse_or_not():
    """The code given runs on the user's model and optimizer: SparseAdam for a sparse embedding
    (Adam raises on its gradients), add_param_group for a dense one, the user's optimizer kept."""
    (f,) = _said(_train(step_sparse=False))
    code = f.remedies[0].code
    for sparse in (True, False):
        torch.manual_seed(0)
        model = _Recommender()
        if not sparse:
            model.emb = nn.Embedding(500, 16)
        optimizer = torch.optim.Adam(model.head.parameters(), lr=1e-3)
        scope = {"model": model, "optimizer": optimizer, "torch": torch}
        exec(code, scope)
        before = model.emb.weight.detach().clone()
        loss = model(torch.randint(0, 500, (8, 5))).square().mean()
        loss.backward()
        optimizer.step()
        if "sparse_optimizer" in scope:
            scope["sparse_optimizer"].step()
        assert ("sparse_optimizer" in scope) == sparse
        assert not torch.equal(model.emb.weight, before)


def test_the_remedy_code_gives_an_lr_to_a_group_at_lr_0_and_adds_what_no_group_holds():
    """A fine-tune's new head left in a param group at lr 0 (a swapped group) was given
    `optimizer.add_param_group({'params': params})`, which raised ValueError ("some parameters
    appear in more than one parameter group") when pasted."""
    from gradwatch.diagnose import advice
    from series_builder import build

    code = advice.give_parameters(advice.Context(build(10)), ("0", "2")).code
    for held in (True, False):
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        groups = [{"params": model[0].parameters(), "lr": 0.1}]
        if held:
            groups.append({"params": model[2].parameters(), "lr": 0.0})
        optimizer = torch.optim.SGD(groups, lr=0.1)
        exec(code, {"model": model, "optimizer": optimizer, "torch": torch})  # noqa: S102  pasted as it is
        lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        assert all(lrs.get(id(p)) == 0.1 for p in model.parameters()), held
        assert len(optimizer.param_groups) == 2
