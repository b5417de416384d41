"""Clipping: torch's clippers, AGC, AutoClip and ZClip against independent float64 re-derivations
(and the peers' own packages where they are installed), sync-freedom, non-finite safety, attach."""

from __future__ import annotations

import doctest
import importlib.util
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch.remedies.clip as clip
from gradwatch.errors import ConfigError


def grads_like(model: nn.Module, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) * scale for p in model.parameters()]


def set_grads(model: nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.Linear(5, 3))


def test_doctests_worked_examples():
    result = doctest.testmod(clip)
    assert result.attempted >= 6 and result.failed == 0


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clip_norm_is_torchs(norm_type):
    a, b = small_model(), small_model()
    grads = grads_like(a, 1, scale=3.0)
    set_grads(a, grads), set_grads(b, grads)
    ours = clip.clip_norm(a.parameters(), 2.0, norm_type)
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), 2.0, norm_type)
    assert torch.equal(ours, ref)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in a.parameters()]), norm_type) \
        == pytest.approx(2.0, rel=1e-5)


def test_clip_value_is_torchs():
    a, b = small_model(), small_model()
    grads = grads_like(a, 2, scale=3.0)
    set_grads(a, grads), set_grads(b, grads)
    clip.clip_value(a.parameters(), 0.5)
    clip.ClipValue(0.5)(list(b.parameters()))
    for p, g in zip(a.parameters(), grads):
        assert torch.equal(p.grad, g.clamp(-0.5, 0.5))
        assert p.grad.abs().max() <= 0.5
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)


# ---- AGC ---------------------------------------------------------------------------------------
def agc_reference(w: np.ndarray, g: np.ndarray, clipping: float, eps: float) -> np.ndarray:
    """timm's adaptive_clip_grad, re-derived in float64 numpy."""
    if w.ndim <= 1:
        wn, gn = np.linalg.norm(w), np.linalg.norm(g)
    else:
        axes = tuple(range(1, w.ndim))
        wn = np.sqrt((w ** 2).sum(axis=axes, keepdims=True))
        gn = np.sqrt((g ** 2).sum(axis=axes, keepdims=True))
    max_norm = np.maximum(wn, eps) * clipping
    return np.where(gn < max_norm, g, g * max_norm / np.maximum(gn, 1e-6))


def test_agc_matches_float64_rederivation():
    model = small_model()
    with torch.no_grad():
        model[4].bias.zero_()  # a zero parameter: eps decides its threshold
    grads = grads_like(model, 3, scale=0.05)
    grads[0][:2] *= 1e-3  # two conv filters with small gradients: left as they are
    set_grads(model, grads)
    before = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    norm = clip.AGC(clipping=0.05, eps=1e-3)(model.parameters())
    assert float(norm) == pytest.approx(before, rel=1e-5)
    clipped_some = kept_some = False
    for p, g in zip(model.parameters(), grads):
        ref = agc_reference(p.detach().double().numpy(), g.double().numpy(), 0.05, 1e-3)
        np.testing.assert_allclose(p.grad.double().numpy(), ref, rtol=1e-5, atol=1e-8)
        clipped_some |= not np.allclose(ref, g.double().numpy())
        kept_some |= bool((ref == g.double().numpy()).any())
    assert clipped_some and kept_some  # the test covers both branches


def timm_agc():
    """timm's agc.py loaded on its own (importing timm itself needs torchvision)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "agc.py"
    module_spec = importlib.util.spec_from_file_location("timm_agc_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_agc_matches_timm():
    agc = timm_agc()
    a, b = small_model(), small_model()
    grads = grads_like(a, 4, scale=0.05)
    set_grads(a, grads), set_grads(b, grads)
    clip.AGC(0.02)(a.parameters())
    agc.adaptive_clip_grad(b.parameters(), clip_factor=0.02, eps=1e-3)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)


# ---- a sequence of gradients with spikes, for the stateful clippers ----------------------------
def norm_sequence(n: int = 100, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    norms = list(1.0 + 0.3 * rng.random(n))
    for i in (i for i in (30, 31, 55, 80) if i < n):
        norms[i] *= 20.0
    norms[5] *= 0.1
    return norms


def grad_sequence(norms: list[float], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in norms:
        v = torch.randn(300, generator=g, dtype=torch.float64)
        out.append((v / v.norm() * n).float())
    return out


def run_clipper(clipper, grads: list[torch.Tensor]) -> tuple[list[float], list[torch.Tensor]]:
    p = nn.Parameter(torch.zeros(300))
    norms, clipped = [], []
    for g in grads:
        p.grad = g.clone()
        norms.append(float(clipper([p])))
        clipped.append(p.grad.clone())
    return norms, clipped


def test_autoclip_matches_numpy_percentile():
    norms_in = norm_sequence(90)
    grads = grad_sequence(norms_in)
    clipper = clip.AutoClip(percentile=10)
    norms, clipped = run_clipper(clipper, grads)
    history = np.array([float(g.double().norm()) for g in grads])
    np.testing.assert_allclose(norms, history, rtol=1e-6)
    for t, (g, c) in enumerate(zip(grads, clipped)):
        threshold = np.percentile(history[: t + 1], 10)  # current norm included, as in the paper
        expect = g.double().numpy() * min(threshold / (history[t] + 1e-6), 1.0)
        np.testing.assert_allclose(c.double().numpy(), expect, rtol=2e-5, atol=1e-7)
    # torch.quantile (what nanquantile reduces to without NaN) agrees with numpy's linear percentile
    assert float(clipper.last_threshold) == pytest.approx(np.percentile(history, 10), rel=1e-5)
    assert clipper.history.numel() == 90


def test_autoclip_grows_and_windows():
    grads = grad_sequence(norm_sequence(40))
    grown = clip.AutoClip(50)
    grown._slot(torch.device("cpu"))
    grown._history = torch.full((4,), float("nan"))  # force several doublings
    run_clipper(grown, grads)
    assert grown._history.numel() == 64 and grown.history.numel() == 40
    windowed = clip.AutoClip(50, window=8)
    run_clipper(windowed, grads)
    last8 = np.array([float(g.double().norm()) for g in grads[-8:]])
    assert float(windowed.last_threshold) == pytest.approx(np.percentile(last8, 50), rel=1e-5)


def test_autoclip_history_matches_autoclip_package():
    """The package keeps the same history; its threshold one step later is ours (it excludes the current norm)."""
    pkg = pytest.importorskip("autoclip.torch")
    grads = grad_sequence(norm_sequence(40))
    ours = clip.AutoClip(percentile=10)
    p = nn.Parameter(torch.zeros(300))
    theirs = pkg.QuantileClip([p], quantile=0.1, history_length=10_000, global_threshold=True)
    q = nn.Parameter(torch.zeros(300))
    for t, g in enumerate(grads):
        q.grad = g.clone()
        ours([q])
        p.grad = g.clone()
        theirs.step()
        hist = theirs.state["global_history"]
        torch.testing.assert_close(hist, ours.history, rtol=1e-6, atol=0)
        assert float(torch.quantile(hist, 0.1)) == pytest.approx(float(ours.last_threshold), rel=1e-6)


# ---- ZClip ---------------------------------------------------------------------------------------
def zclip_reference(norms, alpha=0.97, z_thresh=2.5, warmup=25, eps=1e-6, option="adaptive_scaling",
                    mode="zscore", skip_update_on_spike=False):
    """The zclip package's algorithm in plain float64 Python; returns the clip target per step (None = no clip)."""
    buf, mean, var, out = [], None, None, []
    for g in norms:
        if not math.isfinite(g):  # gradwatch's one deviation: a non-finite norm is ignored
            out.append(None)
            continue
        if mean is None:
            buf.append(g)
            if len(buf) >= warmup:
                mean = sum(buf) / len(buf)
                var = sum((x - mean) ** 2 for x in buf) / len(buf)
            out.append(None)
            continue
        std = var ** 0.5
        target = None
        if mode == "percentile":
            if g > mean + z_thresh * std:
                target = mean + z_thresh * std
        else:
            z = (g - mean) / (std + eps)
            if z > z_thresh:
                target = mean if option == "mean" else mean + (z_thresh * std) / (z / z_thresh)
        out.append(target)
        if target is not None and skip_update_on_spike:
            continue
        eff = g if target is None else target
        mean = alpha * mean + (1 - alpha) * eff
        var = alpha * var + (1 - alpha) * (eff - mean) ** 2
    return out, mean, var


@pytest.mark.parametrize("kwargs", [{}, {"clip_option": "mean"}, {"mode": "percentile"},
                                    {"skip_update_on_spike": True, "warmup_steps": 10, "alpha": 0.9}])
def test_zclip_matches_float64_reference(kwargs):
    norms_in = norm_sequence(100)
    grads = grad_sequence(norms_in)
    history = [float(g.double().norm()) for g in grads]
    ref_kwargs = {"alpha": kwargs.get("alpha", 0.97), "warmup": kwargs.get("warmup_steps", 25),
                  "option": kwargs.get("clip_option", "adaptive_scaling"), "mode": kwargs.get("mode", "zscore"),
                  "skip_update_on_spike": kwargs.get("skip_update_on_spike", False)}
    targets, mean, var = zclip_reference(history, **ref_kwargs)
    clipper = clip.ZClip(**kwargs)
    _, clipped = run_clipper(clipper, grads)
    assert sum(t is not None for t in targets) >= 3  # the spikes were clipped
    for g, c, n, target in zip(grads, clipped, history, targets):
        coef = 1.0 if target is None else target / (n + 1e-6)
        np.testing.assert_allclose(c.double().numpy(), g.double().numpy() * coef, rtol=1e-4, atol=1e-7)
    assert float(clipper.mean) == pytest.approx(mean, rel=1e-4)
    assert float(clipper.var) == pytest.approx(var, rel=1e-3)


@pytest.mark.parametrize("max_grad_norm", [None, 1.1])
def test_zclip_matches_zclip_package(max_grad_norm):
    """Same gradients into the package and into ours, step by step (its defaults: zscore, adaptive_scaling)."""
    pkg = pytest.importorskip("zclip")
    grads = grad_sequence(norm_sequence(100))
    theirs, ours = pkg.ZClip(max_grad_norm=max_grad_norm), clip.ZClip(max_grad_norm=max_grad_norm)
    a, b = nn.Linear(300, 1, bias=False), nn.Linear(300, 1, bias=False)
    for g in grads:
        a.weight.grad = g.view(1, -1).clone()
        b.weight.grad = g.view(1, -1).clone()
        theirs.step(a)
        ours(b.parameters())
        torch.testing.assert_close(b.weight.grad, a.weight.grad, rtol=1e-4, atol=1e-7)
    assert float(ours.mean) == pytest.approx(theirs.mean, rel=1e-4)
    assert float(ours.var) == pytest.approx(theirs.var, rel=1e-3)


# ---- sync-freedom, non-finite safety -------------------------------------------------------------
@pytest.fixture
def no_host_reads(monkeypatch):
    """Any read of a tensor value on the host (item, bool, float, int, tolist, numpy) raises."""
    def boom(*args, **kwargs):
        raise AssertionError("host sync: a tensor value was read on the host")

    def arm():
        for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, boom)
    return arm


@pytest.mark.parametrize("make", [lambda: clip.AGC(), lambda: clip.AutoClip(), lambda: clip.ZClip(warmup_steps=3),
                                  lambda: clip.ClipNorm(1.0), lambda: clip.ClipValue(1.0)])
def test_clippers_never_read_the_device(make, no_host_reads):
    model = small_model()
    clipper = make()
    grads = [grads_like(model, s, scale=s + 1) for s in range(6)]
    no_host_reads()
    for g in grads:  # crosses ZClip's warm-up and AutoClip's first steps
        set_grads(model, g)
        clipper(list(model.parameters()))


def test_non_finite_norms_do_not_poison_state():
    grads = grad_sequence(norm_sequence(40))
    bad = [grads[i].clone() for i in range(2)]
    bad[0][3] = float("nan")
    bad[1][7] = float("inf")
    z = clip.ZClip(warmup_steps=5)
    run_clipper(z, grads[:3] + [bad[0]] + grads[3:6])  # a NaN inside the warm-up
    assert int(z._state["count"]) == 5 and torch.isfinite(z._state["buffer"]).all()
    mean, var = z.mean.clone(), z.var.clone()
    _, out = run_clipper(z, bad)
    assert torch.equal(z.mean, mean) and torch.equal(z.var, var)
    assert torch.isnan(out[0][3]) and torch.isinf(out[1][7])  # left for the guard, not turned into 0 * inf
    assert torch.equal(out[0][:3], bad[0][:3])
    _, clean = run_clipper(z, grads[6:10])
    assert all(torch.isfinite(c).all() for c in clean)

    a = clip.AutoClip(50)
    run_clipper(a, grads[:5] + bad + grads[5:8])
    finite = np.array([float(g.double().norm()) for g in grads[:8]])
    assert float(a.last_threshold) == pytest.approx(np.percentile(finite, 50), rel=1e-5)


# ---- attach ------------------------------------------------------------------------------------
def test_attach_clips_before_every_step_and_removes():
    torch.manual_seed(0)
    model = nn.Linear(10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = torch.randn(8, 10) * 50, torch.randn(8, 1)
    clipper = clip.ClipNorm(0.5)
    handle = clip.attach(opt, clipper)

    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert float(moved.norm()) == pytest.approx(0.5, rel=1e-4)  # lr 1: the step is the clipped gradient
    assert float(clipper.last_norm) > 0.5

    handle.remove()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert float(moved.norm()) > 1.0


def test_attach_zclip_reports_norm():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    z = clip.ZClip()
    with clip.attach(opt, z):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert z.last_norm is not None and int(z._state["count"]) == 1
    assert not opt._optimizer_step_pre_hooks


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, named", [
    (lambda: clip.ClipNorm(-1.0), "max_norm=-1.0"),
    (lambda: clip.ClipNorm(float("inf")), "max_norm=inf"),
    (lambda: clip.clip_norm([], float("nan")), "max_norm=nan"),
    (lambda: clip.ClipValue(0), "clip_value=0"),
    (lambda: clip.clip_value([], -5), "clip_value=-5"),
    (lambda: clip.AGC(clipping=-0.01), "clipping=-0.01"),
    (lambda: clip.AutoClip(percentile=0), "percentile=0"),
    (lambda: clip.AutoClip(percentile=100.5), "percentile=100.5"),
    (lambda: clip.ZClip(alpha=1.0), "alpha=1.0"),
    (lambda: clip.ZClip(alpha=0), "alpha=0"),
    (lambda: clip.ZClip(z_thresh=float("nan")), "z_thresh=nan"),
    (lambda: clip.ZClip(warmup_steps=0), "warmup_steps=0"),
    (lambda: clip.ZClip(eps=-1), "eps=-1 must be a finite number > 0; pass e.g. ZClip(eps=1e-6"),
    (lambda: clip.ZClip(mode="median"), "mode='median'"),
    (lambda: clip.ClipNorm(1.0, norm_type="fro"), "norm_type='fro'"),
    (lambda: clip.ClipNorm(1.0, norm_type=-3), "norm_type=-3"),
    (lambda: clip.AutoClip(norm_type=float("nan")), "norm_type=nan"),
    # the function took them to torch: p=0 counted nonzero tensors, p=-1 was a harmonic mean, "fro" a ValueError
    (lambda: clip.clip_norm([nn.Parameter(torch.ones(2))], 1.0, norm_type=0), "norm_type=0"),
    (lambda: clip.clip_norm([nn.Parameter(torch.ones(2))], 1.0, norm_type="fro"), "norm_type='fro'"),
    (lambda: clip.attach("opt", clip.ZClip()), "optimizer='opt' is not a torch.optim.Optimizer"),
    # a model instead of its parameters was an AttributeError from inside torch ('Linear' has no 'grad'),
    # and a model passed as the optimizer printed its whole module tree into the message
    (lambda: clip.clip_norm(nn.Sequential(nn.Linear(2, 2)), 1.0), "params=<Sequential> is a model, not its "
                                                                  "parameters; pass model.parameters"),
    (lambda: clip.ClipNorm()([1, 2]), "params holds 1, which is not a tensor"),
    (lambda: clip.AGC()(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)), "is an optimizer, not its"),
    (lambda: clip.ZClip()(3), "params=3 is not an iterable of tensors"),
    (lambda: clip.attach(nn.Sequential(*[nn.Linear(2, 2)] * 9), clip.ZClip()),
     "optimizer=<Sequential> is not a torch.optim.Optimizer"),
])
def test_bad_input_names_the_value(call, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(".", r"\.")):
        call()


def test_attach_to_an_optimizer_without_params():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    opt.param_groups[0]["params"] = []
    with pytest.raises(ConfigError, match="no parameters"):
        clip.attach(opt, clip.ZClip())
    assert clip.AutoClip(percentile=100).percentile == 100.0


# ---- sparse gradients (nn.Embedding(sparse=True)) -----------------------------------------------------
def embedding_pair(seed: int = 0) -> tuple[nn.Embedding, nn.Embedding]:
    """The same embedding twice, one with a sparse gradient, the other with the same gradient dense.
    Repeated ids leave the sparse gradient uncoalesced; some rows get far larger gradients than others."""
    torch.manual_seed(seed)
    sparse = nn.Embedding(12, 5, sparse=True)
    dense = nn.Embedding(12, 5)
    dense.load_state_dict(sparse.state_dict())
    ids = torch.tensor([1, 2, 2, 7, 7, 7, 9])
    scale = torch.tensor([0.001, 3.0, 2.0, 5.0, 1.0, 4.0, 0.002]).unsqueeze(1) * torch.randn(7, 5)
    for emb in (sparse, dense):
        (emb(ids) * scale).sum().backward()
    assert sparse.weight.grad.is_sparse and not sparse.weight.grad.is_coalesced()
    return sparse, dense


@pytest.mark.parametrize("make", [lambda: clip.ClipNorm(1.0), lambda: clip.ClipNorm(1.0, norm_type=math.inf),
                                  lambda: clip.ClipValue(0.5), lambda: clip.AGC(0.05),
                                  lambda: clip.AutoClip(10), lambda: clip.ZClip(warmup_steps=2, max_grad_norm=1.0)])
def test_sparse_gradients_are_clipped_as_their_dense_equal(make):
    """Before, every clipper raised torch's NotImplementedError (no vector_norm for sparse tensors).
    A sparse gradient must come out of a clipper as its dense equal does (dense clipping is checked
    against torch and float64 references above), and still be sparse."""
    ours, ref = make(), make()
    clipped = False
    for seed in range(3):  # several calls: the stateful clippers' history and warm-up take sparse norms too
        sparse, dense = embedding_pair(seed)
        before = dense.weight.grad.clone()
        norm, ref_norm = ours([sparse.weight]), ref([dense.weight])
        assert sparse.weight.grad.is_sparse
        torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad, rtol=1e-6, atol=1e-7)
        if ref_norm is not None:
            torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
        clipped |= not torch.equal(dense.weight.grad, before)
    assert clipped


def test_sparse_clip_norm_matches_torch_on_the_dense_gradient():
    sparse, dense = embedding_pair()
    norm = clip.clip_norm([sparse.weight], 1.0)
    ref = torch.nn.utils.clip_grad_norm_([dense.weight], 1.0)
    torch.testing.assert_close(norm, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad, rtol=1e-6, atol=1e-7)
    assert float(dense.weight.grad.norm()) == pytest.approx(1.0, rel=1e-5)


def test_sparse_agc_matches_float64_rederivation():
    sparse, dense = embedding_pair()
    grad = dense.weight.grad.double().numpy()
    clip.AGC(0.05)([sparse.weight])
    ref = agc_reference(sparse.weight.detach().double().numpy(), grad, 0.05, 1e-3)
    np.testing.assert_allclose(sparse.weight.grad.to_dense().double().numpy(), ref, rtol=1e-5, atol=1e-8)
    assert not np.allclose(ref, grad)  # some rows were clipped


def test_attach_with_a_sparse_embedding_trains_as_the_dense_one():
    sparse, dense = embedding_pair()
    for emb in (sparse, dense):
        opt = torch.optim.SGD(emb.parameters(), lr=1.0)
        with clip.attach(opt, clip.ZClip(warmup_steps=1, max_grad_norm=1.0)):
            opt.step()
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-6, atol=1e-7)


def test_agc_names_a_parameter_whose_rows_it_cannot_find():
    """A gradient sparse over both dims of a matrix has no stored rows to clip: a ConfigError that
    names the parameter, not torch's NotImplementedError."""
    p = nn.Parameter(torch.ones(4, 3))
    p.grad = torch.sparse_coo_tensor([[0, 2], [1, 1]], [5.0, 6.0], (4, 3))
    with pytest.raises(ConfigError, match=r"parameter 1 \(shape \(4, 3\)\) has a sparse gradient"):
        clip.AGC()([nn.Parameter(torch.ones(2)), p])


# ---- AGC and non-finite gradients --------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_agc_leaves_non_finite_units_as_they_are(bad):
    """Before, a unit holding an Inf was scaled by λ‖w‖/Inf = 0 and came out [nan, 0, 0], against the
    docs (non-finite gradients are left as they are, for the guard); the other units are still clipped."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3, 4))
    grad = torch.randn(3, 4)
    grad[1, 2] = bad
    p.grad = grad.clone()
    clip.AGC(0.05)([p])
    assert torch.equal(p.grad[1].isnan(), grad[1].isnan()) and torch.equal(p.grad[1].nan_to_num(), grad[1].nan_to_num())
    finite = [0, 2]
    ref = agc_reference(p.detach()[finite].double().numpy(), grad[finite].double().numpy(), 0.05, 1e-3)
    np.testing.assert_allclose(p.grad[finite].double().numpy(), ref, rtol=1e-5, atol=1e-8)
    assert not np.allclose(ref, grad[finite].double().numpy())


# ---- numpy scalars -------------------------------------------------------------------------------------
def test_numpy_scalars_are_numbers():
    """Before, np.float32 / np.int64 arguments were rejected as "not a number"."""
    assert clip.ClipNorm(np.float32(1.5)).max_norm == 1.5
    assert clip.ClipValue(np.float64(0.5)).clip_value == 0.5
    assert clip.AGC(clipping=np.float32(0.25), eps=np.float64(1e-3)).clipping == 0.25
    auto = clip.AutoClip(percentile=np.float32(10), window=np.int64(100))
    assert (auto.percentile, auto.window) == (10.0, 100) and type(auto.window) is int
    z = clip.ZClip(alpha=np.float64(0.9), z_thresh=np.float32(2.0), warmup_steps=np.int32(5))
    assert (z.alpha, z.z_thresh, z.warmup_steps) == (0.9, 2.0, 5)


@pytest.mark.parametrize("call, named", [
    (lambda: clip.ClipNorm(np.float32("nan")), "max_norm=np.float32(nan)"),
    (lambda: clip.ClipNorm(np.float64("inf")), "max_norm=np.float64(inf)"),
    (lambda: clip.AGC(clipping=np.float32(-0.5)), "clipping=np.float32(-0.5)"),
    (lambda: clip.AutoClip(window=np.int64(0)), "window=np.int64(0)"),
    (lambda: clip.AutoClip(window=100.0), "window=100.0"),
    (lambda: clip.ZClip(warmup_steps=True), "warmup_steps=True"),
    (lambda: clip.ClipNorm(np.bool_(True)), "max_norm=np.True_"),
    (lambda: clip.ZClip(alpha=np.float32(1.5)), "alpha=np.float32(1.5)"),
])
def test_bad_numpy_scalars_are_still_rejected(call, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        call()


@pytest.mark.parametrize("make", [lambda: clip.ClipNorm(1.0), lambda: clip.ClipValue(0.1), lambda: clip.AGC(),
                                  lambda: clip.AutoClip(), lambda: clip.ZClip()])
def test_every_clipper_returns_and_keeps_the_norm_before_clipping(make):
    """As docs/remedies.md says of every clipper; ClipValue returned None and ClipNorm, AGC called
    directly kept no last_norm."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    model(torch.randn(16, 8)).pow(2).sum().mul(50).backward()
    before = torch.nn.utils.get_total_norm([p.grad.clone() for p in model.parameters()])
    clipper = make()
    norm = clipper(model.parameters())
    torch.testing.assert_close(norm, before)
    assert clipper.last_norm is norm


def test_attaching_the_same_clipper_twice_is_refused():
    """Before, attaching a clipper twice ran it twice per step: ZClip's warm-up of 4 steps ended after 2."""
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    z = clip.ZClip(warmup_steps=4)
    handle = clip.attach(opt, z)
    with pytest.raises(ConfigError, match="already attached"):
        clip.attach(opt, z)
    clip.attach(opt, clip.ClipValue(10.0)).remove()  # another clipper is fine
    for _ in range(2):
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
    assert int(z._state["count"]) == 2  # one norm per step
    handle.remove()
    clip.attach(opt, z).remove()  # once removed, it can be attached again


@pytest.mark.parametrize("make", [lambda: clip.ZClip(warmup_steps=10), lambda: clip.AutoClip(20),
                                  lambda: clip.AutoClip(20, window=15)])
def test_resumed_clipper_clips_as_the_uninterrupted_one(make, tmp_path):
    """Before, AutoClip and ZClip had no state_dict: a run resumed from a checkpoint warmed ZClip up
    again (no clipping for warmup_steps) and took AutoClip's percentile over the norms since the restart."""
    grads = grad_sequence(norm_sequence(60))
    _, whole = run_clipper(make(), grads)
    first = make()
    run_clipper(first, grads[:30])
    torch.save(first.state_dict(), tmp_path / "clip.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "clip.pt"))
    _, rest = run_clipper(resumed, grads[30:])
    for a, b in zip(whole[30:], rest):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    fresh_rest = run_clipper(make(), grads[30:])[1]
    assert any(not torch.equal(a, b) for a, b in zip(whole[30:], fresh_rest))  # the state matters
    with pytest.raises(ConfigError, match="state_dict"):
        make().load_state_dict({"nope": 1})


def test_autoclip_refuses_the_state_of_another_window():
    # A windowed history is a ring of its last `window` norms; loaded into a clipper keeping every
    # norm it became the first entries of a history `steps` long, the gap between them NaN, and the
    # clipper's "same window" requirement went unchecked.
    grads = grad_sequence(norm_sequence(12))
    windowed, whole = clip.AutoClip(20, window=5), clip.AutoClip(20)
    run_clipper(windowed, grads)
    run_clipper(whole, grads)
    for target, state in [(clip.AutoClip(20), windowed.state_dict()),
                          (clip.AutoClip(20, window=8), windowed.state_dict()),
                          (clip.AutoClip(20, window=5), whole.state_dict())]:
        with pytest.raises(ConfigError, match="window"):
            target.load_state_dict(state)
    clip.AutoClip(20, window=20).load_state_dict(whole.state_dict())  # 12 norms fit a window of 20: the same


def train_with_scaler(clip_by_attach: bool):
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    clipper = clip.ClipNorm(0.5)
    if clip_by_attach:
        clip.attach(opt, clipper)
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.ones(2, 4) * 3).float().pow(2).sum()
        scaler.scale(loss).backward()
        if not clip_by_attach:  # torch's recipe: unscale, clip, step
            scaler.unscale_(opt)
            clipper.last_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
    return clipper.last_norm, model.weight.detach(), opt.state[model.weight]["exp_avg"]


def test_attached_clipper_sees_unscaled_gradients_of_a_fused_optimizer_under_grad_scaler():
    """Before, GradScaler left a fused Adam's gradients scaled (it unscales inside its step): the
    clipper saw norm 48972 (1024x the true 47.8) and bounded the true gradient by 0.5/1024."""
    try:
        ours = train_with_scaler(True)
    except RuntimeError as exc:  # no fused Adam on this build
        pytest.skip(str(exc))
    reference = train_with_scaler(False)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("make_opt, by_keyword", [
    (lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=4), False),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), True),
])
def test_attached_clipper_clips_the_gradients_a_closure_step_uses(make_opt, by_keyword):
    """Before, the pre-step hook clipped last step's stale gradients and the closure then computed
    fresh, unclipped ones: on LBFGS an attached ClipNorm changed nothing at all."""
    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)) * 5, torch.randn(32, 1)

    def train(attached: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = make_opt(model.parameters())
        if attached:
            clip.attach(opt, clip.ClipNorm(0.05))

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if not attached:  # torch's recipe: clip inside the closure, after backward
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            return loss
        for _ in range(3):
            opt.step(closure=closure) if by_keyword else opt.step(closure)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(True), train(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_attaching_a_clipper_class_instead_of_an_instance_is_refused():
    """Before, attach(opt, ZClip) was accepted and the first step failed with 'alpha=[Parameter ...]'."""
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"clipper=ZClip is a class.*gw\.clip\.ZClip\(\)"):
        clip.attach(opt, clip.ZClip)


@pytest.mark.parametrize("make", [lambda: clip.AutoClip(10), lambda: clip.ZClip(warmup_steps=3)])
def test_steps_without_gradients_leave_the_history_alone(make):
    """Gradual unfreezing: the backbone's optimizer steps while the backbone is frozen (no
    gradients). Before, each such step entered a norm of 0: AutoClip's 10th percentile became 0 and
    clipped the unfrozen backbone's gradients to nothing; ZClip warmed up on zeros. Now the run
    clips as a twin whose clipper is attached only at unfreezing."""
    def train(frozen_steps_seen: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        backbone, head = nn.Linear(6, 6), nn.Linear(6, 1)
        opt_backbone = torch.optim.SGD(backbone.parameters(), lr=0.1)
        opt_head = torch.optim.SGD(head.parameters(), lr=0.1)
        clipper = make()
        if frozen_steps_seen:
            clip.attach(opt_backbone, clipper)
        backbone.requires_grad_(False)
        g = torch.Generator().manual_seed(1)
        for step in range(12):
            if step == 6:  # unfreeze
                backbone.requires_grad_(True)
                if not frozen_steps_seen:
                    clip.attach(opt_backbone, clipper)
            x, y = torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)
            opt_backbone.zero_grad(), opt_head.zero_grad()
            nn.functional.mse_loss(head(torch.tanh(backbone(x))), y).backward()
            opt_backbone.step(), opt_head.step()
        return [p.detach().clone() for p in backbone.parameters()]

    for a, b in zip(train(True), train(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_attaching_a_function_that_needs_more_than_the_parameters_is_refused():
    """Before, attach(opt, gw.clip.clip_norm) was accepted and the first optimizer.step() failed
    deep inside with "clip_norm() missing 1 required positional argument: 'max_norm'"."""
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"clipper=clip_norm cannot be called with the parameters alone "
                                          r"\(missing a required argument: 'max_norm'\).*clip_norm\(params, 1\.0\)"):
        clip.attach(opt, clip.clip_norm)
    for fine in (lambda params: clip.clip_norm(params, 1.0), clip.ClipNorm(1.0), lambda *params: None):
        clip.attach(opt, fine).remove()


def test_attaching_to_lbfgs_warns_that_clipping_breaks_its_curvature_estimate():
    """Clipping each of LBFGS's gradients by its own factor makes y = g' - g no difference of one
    function's gradients. Measured here: unclipped LBFGS fits a separable softmax regression to a
    loss < 1e-5, the same run clipped to norm 0.05 diverges (> 1e3). attach now says so, with the fix."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 20, generator=g)
    y = (x @ torch.randn(20, 4, generator=g)).argmax(1)

    def final_loss(clipped: bool) -> float:
        torch.manual_seed(0)
        model = nn.Linear(20, 4)
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=10)
        if clipped:
            with pytest.warns(UserWarning, match=r"breaks its curvature estimate.*line_search_fn='strong_wolfe'"):
                clip.attach(opt, clip.ClipNorm(0.05))

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        for _ in range(5):
            opt.step(closure)
        return float(closure())

    assert final_loss(False) < 1e-5 and final_loss(True) > 1e3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip.attach(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), clip.ClipNorm(0.05))


def test_stateful_clippers_keep_a_float64_models_precision():
    """Before, AutoClip's history and ZClip's mean and variance were float32 whatever the gradients:
    a float64 model's clipped gradients were off by ~3e-6 relative (ZClip) against the float64
    reference. Now its statistics are float64 too and agree to rounding (a bfloat16 model's stay float32)."""
    grads = [g.double() for g in grad_sequence(norm_sequence(60))]
    history = [float(g.norm()) for g in grads]
    p = nn.Parameter(torch.zeros(300, dtype=torch.float64))
    targets, _, _ = zclip_reference(history, warmup=10)
    auto, z = clip.AutoClip(percentile=10), clip.ZClip(warmup_steps=10)
    for t, (g, n, target) in enumerate(zip(grads, history, targets)):
        p.grad = g.clone()
        auto([p])
        expect = g * min(np.percentile(history[: t + 1], 10) / (n + 1e-6), 1.0)
        torch.testing.assert_close(p.grad, expect, rtol=1e-12, atol=0)
        p.grad = g.clone()
        z([p])
        torch.testing.assert_close(p.grad, g * (1.0 if target is None else target / (n + 1e-6)), rtol=1e-12, atol=0)
    assert sum(t is not None for t in targets) >= 3 and auto.history.dtype == z.mean.dtype == torch.float64
    half = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    half.grad = torch.ones(3, dtype=torch.bfloat16)
    auto, z = clip.AutoClip(), clip.ZClip()
    auto([half]), z([half])
    assert auto.history.dtype == z.mean.dtype == torch.float32


def test_clip_value_complex_clamps_real_and_imaginary_parts():
    # torch's clamp rejects complex tensors; a complex parameter is stepped by torch's optimizers as
    # its real view, so each of its two real entries is clamped, beside a real parameter as usual.
    g = torch.Generator().manual_seed(0)
    z = nn.Parameter(torch.zeros(4, 3, dtype=torch.complex64))
    r = nn.Parameter(torch.zeros(5))
    z.grad = torch.randn(4, 3, dtype=torch.complex64, generator=g) * 3
    r.grad = torch.randn(5, generator=g) * 3
    want_z = torch.complex(z.grad.real.clamp(-1, 1), z.grad.imag.clamp(-1, 1))
    want_r = r.grad.clamp(-1, 1)
    want_norm = math.sqrt(float(z.grad.abs().double().square().sum() + r.grad.double().square().sum()))
    norm = clip.ClipValue(1.0)([z, r])
    assert torch.equal(z.grad, want_z) and torch.equal(r.grad, want_r)
    assert float(norm) == pytest.approx(want_norm, rel=1e-6)  # the norm before clamping


@pytest.mark.parametrize("make", [lambda: clip.ClipNorm(1.0), lambda: clip.AGC(), lambda: clip.AutoClip(),
                                  lambda: clip.ZClip(warmup_steps=2)], ids=["norm", "agc", "autoclip", "zclip"])
def test_float16_spike_with_a_norm_beyond_float16_range_is_clipped_as_in_float64(make):
    # Entries of 1000 over 1e5 weights: a finite float16 gradient whose norm, 3.2e5, is beyond
    # float16's 65504. Normed in float16 it was Inf: AGC, AutoClip and ZClip left the spike as it was
    # (taken for non-finite), ClipNorm (torch's function) scaled it to 0. Reference: the same clipper
    # on the same gradients in float64.
    runs = {}
    for dtype in (torch.float16, torch.float64):
        clipper, p = make(), nn.Parameter(torch.full((10, 10000), 0.01, dtype=dtype))
        for step in range(4):
            p.grad = torch.full((10, 10000), 1000.0 if step == 3 else 0.01, dtype=dtype)
            norm = clipper([p])
        runs[dtype] = float(norm), p.grad.double()
    (norm16, grad16), (norm64, grad64) = runs[torch.float16], runs[torch.float64]
    assert norm64 == pytest.approx(1000 * math.sqrt(1e5)) and norm16 == pytest.approx(norm64, rel=1e-3)
    assert float(grad64.abs().max()) < 1.0  # every clipper clips this spike
    torch.testing.assert_close(grad16, grad64, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("make, quiet", [(lambda: clip.ClipNorm(1.0), False), (lambda: clip.ZClip(), False),
                                         (lambda: clip.AutoClip(), False), (lambda: clip.AGC(), False),
                                         (lambda: clip.ClipValue(1.0), True)],
                         ids=["norm", "zclip", "autoclip", "agc", "value"])
def test_attach_to_fsdp1_shards_without_their_group_warns(make, quiet):
    # FSDP1 (use_orig_params=True) marks the parameters it shards with `_fsdp_flattened` and gives
    # them no group: a norm-based clipper without process_group= (AGC: fsdp=) silently clipped each
    # rank by its own shard's norm. Clamping by value is element-wise and needs nothing.
    model = nn.Linear(4, 2)
    for p in model.parameters():
        p._fsdp_flattened = True
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clip.attach(opt, make()).remove()
    said = [str(w.message) for w in caught if "FSDP1" in str(w.message)]
    assert said == [] if quiet else len(said) == 1 and "process_group=model.process_group" in said[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip.attach(torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1), make()).remove()  # no FSDP: silent
