"""The code that gives left-out weights to the optimizer runs on the user's model and trains them
as a hand-written setup would: an Embedding or EmbeddingBag with sparse=True to a SparseAdam of its
own (Adam refuses sparse gradients), zeroed every step (else its gradients pile up), dense modules
beside it to the user's optimizer; under SGD, which takes sparse gradients, all to the user's."""

import pytest
import torch
from torch import nn

from gradwatch.diagnose import advice
from gradwatch.store.series import LayerInfo
from series_builder import build


class _Model(nn.Module):
    def __init__(self, bag: bool):
        super().__init__()
        self.emb = nn.EmbeddingBag(50, 8, sparse=True, mode="mean") if bag else nn.Embedding(50, 8, sparse=True)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.bag = bag

    def forward(self, ids):
        e = self.emb(ids) if self.bag else self.emb(ids).mean(1)
        return self.head(torch.tanh(self.mid(e)))


def _code(emb_type: str, optimizer: str) -> str:
    run = build(n_steps=20, optimizer=optimizer, lr=1e-2)
    run.layers[:0] = [LayerInfo("emb", emb_type, -1, "param", 400), LayerInfo("mid", "Linear", -1, "param", 72)]
    return advice.give_parameters(advice.Context(run), ("emb", "mid")).code


def _train(model, step, zero, steps=5):
    torch.manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 50, (16, 4))
        zero()
        model(ids).square().mean().backward()
        step()


@pytest.mark.parametrize("bag", [False, True])
@pytest.mark.parametrize("name,kw", [("Adam", {}), ("SGD", {"weight_decay": 1e-4})])
def test_the_printed_code_trains_sparse_and_dense_modules_as_a_hand_written_setup(bag, name, kw):
    torch.manual_seed(0)
    model, reference = _Model(bag), _Model(bag)
    reference.load_state_dict(model.state_dict())
    opt_cls = getattr(torch.optim, name)
    optimizer = opt_cls(model.head.parameters(), lr=1e-2, **kw)
    code = _code("EmbeddingBag" if bag else "Embedding", name)
    scope = {"model": model, "optimizer": optimizer, "torch": torch}
    exec(code, scope)
    extra = scope.get("sparse_optimizer")
    assert (extra is not None) == (name == "Adam")
    if extra is not None:  # the comment tells the user to zero and step it beside their optimizer
        assert "sparse_optimizer.zero_grad()" in code and "sparse_optimizer.step()" in code
    _train(model, lambda: (optimizer.step(), extra and extra.step()),
           lambda: (optimizer.zero_grad(), extra and extra.zero_grad()))
    # by hand: the dense modules in the user's optimizer, the sparse one where it is taken
    dense = opt_cls([{"params": reference.head.parameters()}, {"params": reference.mid.parameters()}], lr=1e-2, **kw)
    sparse = (torch.optim.SparseAdam(reference.emb.parameters(), lr=1e-2) if name == "Adam" else None)
    if sparse is None:
        dense.add_param_group({"params": reference.emb.parameters(), "weight_decay": 0.0})
    _train(reference, lambda: (dense.step(), sparse and sparse.step()), lambda: (dense.zero_grad(), sparse and sparse.zero_grad()))
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), n
