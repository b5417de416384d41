"""What a watched step costs beyond the numbers it stores: hooks made once, the small gradients'
grouping reused only while it still fits, and no kernel a sampled step does not need. The values
are checked against torch's own, one tensor at a time."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch
from gradwatch.collect.small_grads import SmallGrads
from gradwatch.collect.stats import MISSING


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _step(model, opt, x):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_sampled_step_hooks_are_made_once_and_reused():
    """Each sample armed a new hook per layer, wrapped for torch.compile: 20-180 ms a sample for
    2000 layers, mostly collecting the wrappers' cyclic garbage. The next sample reuses them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    armed = []
    with gradwatch.watch(model, opt, sample_every=2, warn=False) as watch:
        for step in range(5):
            if step % 2 == 0:  # sampled: the hooks are on
                armed.append([list(m._forward_hooks.values()) for m in model])
            _step(model, opt, x)
        run = watch.series()
    assert all(hooks for hooks in armed[1])
    assert armed[1] == armed[2]  # the same function objects, sample after sample
    assert all(set(a) <= set(b) for a, b in zip(armed[1], armed[0]))  # (step 0 also orders the layers)
    assert all(not m._forward_hooks for m in model)  # and removed between samples
    assert (~torch.isnan(torch.as_tensor(run.metrics["act_mean"][:, run.column("1")]))).sum() == 3


def _norm32(t: torch.Tensor, ord: float = 2.0) -> float:
    """torch's own norm of one tensor, as the store keeps it (float32; float64 summed in float64)."""
    if t.dtype == torch.float64:
        return torch.linalg.vector_norm(t, ord).float().item()
    return torch.linalg.vector_norm(t, ord, dtype=torch.float32).item()


def _read(small: SmallGrads, params: list[torch.Tensor], sampled: bool = True) -> list[list[float]]:
    n = len(params)
    bufs = [torch.full((n,), MISSING) for _ in range(3)]
    for i, p in enumerate(params):
        small.indices.append(i)
        small.grads.append(p.grad)
    small.read(params, *bufs, sampled=sampled)
    return [b.tolist() for b in bufs]


def _expected(params: list[torch.Tensor]) -> list[list[float]]:
    return [[_norm32(p.grad) for p in params], [_norm32(p.grad, float("inf")) for p in params],
            [_norm32(p.detach()) for p in params]]


@pytest.mark.parametrize("shapes", [((4,), (3, 2), (4,), (), (3, 2), ()),  # each shape too rare to stack
                                    ((4,), (3, 2), (4,), (), (3, 2), (), (4,), (3, 2), (4,), (3, 2), (4,))],
                         ids=["loose", "stacked"])
def test_small_gradients_regrouped_when_a_shape_or_dtype_changes(shapes):
    """The grouping of the last read is reused while the same parameters come in the same order
    with the same dtypes; a dtype or shape changed since (model.double() mid-run, a weight
    replaced) is regrouped, so each norm stays bitwise torch's own for that tensor alone, whether
    its shape's gradients are stacked or read one by one."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e3
    small = SmallGrads()
    assert _read(small, params) == _expected(params)
    assert _read(small, params, sampled=False)[0] == _expected(params)[0]  # the grouping reused

    params[2].data = params[2].data.double()  # one of a group cast: stacked with the others, it was
    params[2].grad = torch.randn(4, dtype=torch.float64) * 1e3  # summed in float64 with them
    assert _read(small, params) == _expected(params)

    params[1].data = torch.randn(6)  # a weight replaced by one of another shape
    params[1].grad = torch.randn(6)
    assert _read(small, params) == _expected(params)


def test_a_sampled_step_runs_only_the_kernels_it_needs():
    """With every watched weight in the watched optimizer, no weight norm is taken from the copy of
    the weights before the update (one pass over the weights less); max |g| of a large gradient
    is its amax and amin, ~3x faster than aminmax on the CPU. The values: torch's own."""
    torch.manual_seed(0)
    # 6400 entries: not small; no biases, which are (read together after backward, by _foreach_norm)
    model = nn.Sequential(nn.Linear(80, 80, bias=False), nn.ReLU(), nn.Linear(80, 80, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 80)
    with gradwatch.watch(model, opt, sample_every=2, warn=False) as watch:
        with CountOps() as counted:
            opt.zero_grad()
            model(x).square().mean().backward()
            grads = [p.grad.clone() for p in model.parameters()]
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            _step(model, opt, x)  # its start closes step 0's update window
        run = watch.series()
    assert counted.ops.get("aminmax", 0) == 0
    assert counted.ops["_foreach_norm"] == 1  # ‖Δw‖ only
    for name, w in zip(("0", "2"), (0, 1)):
        col = run.column(name)
        assert run.metrics["grad_max"][0, col] == grads[w].abs().max().item()
        weight = before[w].double().norm().item()
        assert abs(run.metrics["weight_norm"][0, col] - weight) <= 1e-6 * weight
    # (the update ratio itself: test_watch_update_window, against float64 brute force)
