"""Frozen, shared and unused parameters, accumulation, manual updates, AMP scaling, NaN, bad input."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.errors import ConfigError
from gradwatch.diagnose import diagnose


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # tied
        self.unused = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.b(torch.relu(self.a(self.frozen(x))))


def test_frozen_shared_unused():
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt) as watch:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(5, 4)).sum().backward()
            opt.step()
        series = watch.series()
    names = series.layer_names()
    assert "frozen" not in names  # nothing trainable: not a layer
    assert names.count("a") == 1 and "b" in names  # tied weight counted once, under "a"
    assert np.isnan(series.metrics["grad_norm"][:, series.column("unused")]).all()
    a_weight_grad = model.a.weight.grad.norm().item()
    a_bias_grad = model.a.bias.grad.norm().item()
    assert series.metrics["grad_norm"][-1, series.column("a")] == pytest.approx(math.hypot(a_weight_grad, a_bias_grad), rel=1e-5)


@pytest.mark.parametrize("last_in_closure", [False, True])
def test_gradient_accumulation_counts_optimizer_steps(last_in_closure):
    """Three micro-batches of loss / 3 per step: the step's loss is their sum, the mean loss the
    gradient is of (it was the mean of loss / 3, a third of it). Lightning runs the last micro-batch
    in optimizer.step(closure): it counts too (it was dropped)."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt) as watch:
        for _ in range(4):
            opt.zero_grad()
            losses = []

            def micro_batch():
                loss = model(torch.randn(2, 3)).pow(2).mean()
                (loss / 3).backward()
                losses.append(loss.item())
                return loss

            for _ in range(2 if last_in_closure else 3):
                micro_batch()
            if last_in_closure:
                opt.step(micro_batch)
            else:
                opt.step()
        series = watch.series()
    assert list(series.steps) == [0, 1, 2, 3]
    assert series.loss[-1] == pytest.approx(np.mean(losses), rel=1e-6)


def test_the_accumulated_gradient_is_recorded():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt) as watch:
        opt.zero_grad()
        for _ in range(3):
            model(torch.randn(2, 3)).pow(2).mean().backward()
        grad = math.hypot(model.weight.grad.norm().item(), model.bias.grad.norm().item())
        opt.step()
        series = watch.series()
    assert series.metrics["grad_norm"][-1, 0] == pytest.approx(grad, rel=1e-6)


def test_manual_update_without_optimizer():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    with gradwatch.watch(model, sample_every=1) as watch:
        for _ in range(3):
            model(torch.randn(8, 3)).pow(2).mean().backward()
            before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
            after = torch.cat([p.detach().flatten() for p in model.parameters()])
        series = watch.series()
    assert list(series.steps) == [0, 1, 2]
    expected = ((after - before).norm() / before.norm()).item()
    assert series.metrics["update_ratio"][-1, 0] == pytest.approx(expected, rel=1e-5)


def test_grad_scaler_values_are_unscaled_and_overflow_steps_skipped():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.randn(8, 4)
    with gradwatch.watch(model, opt, sample_every=1) as watch:
        for step in range(3):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            if step == 1:
                loss = loss * float("inf")  # an overflow step the scaler skips
            scaler.scale(loss).backward()
            if step != 1:
                true_grad = math.hypot(model.weight.grad.norm().item(), model.bias.grad.norm().item()) / scaler.get_scale()
                true_loss = loss.item()
            scaler.step(opt)
            scaler.update()
        series = watch.series()
    assert series.meta["skipped_steps"] == [1]
    assert len(series.steps) == 2
    assert series.loss[-1] == pytest.approx(true_loss, rel=1e-6)
    assert series.metrics["grad_norm"][-1, 0] == pytest.approx(true_grad, rel=1e-5)


def test_huge_loss_scale_is_no_non_finite_gradient():
    """Under bf16 autocast GradScaler's scale keeps doubling: past ~2^64 the scaled gradient's
    float32 sum of squares overflows although every entry is finite. The recorded norm is the
    true (unscaled) one, no step is called non-finite, and stop_on does not stop the run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, growth_interval=10**6)
    x = torch.randn(8, 4)
    true = []
    with gradwatch.watch(model, opt, warn=False, stop_on=("non_finite",)) as watch:
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(model(x).pow(2).mean()).backward()
            grad = model[0].weight.grad.double() / scaler.get_scale()
            assert torch.isfinite(grad).all() and torch.isinf(model[0].weight.grad.pow(2).sum())
            true.append(grad.norm().hypot(model[0].bias.grad.double().norm() / scaler.get_scale()).item())
            scaler.step(opt)
            scaler.update()
        series = watch.series()
    assert len(series.steps) == 3 and not series.meta["skipped_steps"]
    assert series.metrics["grad_norm"][:, 0] == pytest.approx(true, rel=1e-5)
    assert (series.metrics["nonfinite"] == 0).all()
    assert not [f for f in watch.findings() if f.kind == "non_finite"]


def test_huge_finite_weights_and_activations_are_no_non_finite_values():
    """A tester's first layer scaled by 1e20 at lr 0: every weight and activation finite, yet the
    float32 sums of squares of the weight norm and the activations' std overflowed, and the run was
    told its weights held NaN/Inf before any update. Taken again in float64 where that happens."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        model[0].weight.mul_(1e20)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(64, 8)
    assert torch.isinf(torch.linalg.vector_norm(model[0].weight))  # (the float32 norm itself overflows)
    with gradwatch.watch(model, opt, warn=False, sample_every=1) as watch:
        for _ in range(3):
            opt.zero_grad()
            model(x).abs().mean().backward()
            opt.step()
        series = watch.series()
    hidden = model[1](model[0](x)).double()
    assert series.metrics["weight_norm"][:, 0] == pytest.approx(model[0].weight.double().norm().item(), rel=1e-6)
    assert series.metrics["act_std"][:, 1] == pytest.approx(hidden.std().item(), rel=1e-5)
    assert not [f for f in diagnose(series) if f.kind == "non_finite"]


def test_sparse_gradients_are_recorded():
    """nn.Embedding(sparse=True): the norm of the coalesced values (duplicate rows summed), as
    torch's own dense norm of the same gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8, sparse=True), nn.Flatten(), nn.Linear(24, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.tensor([[1, 1, 2], [3, 1, 5]])  # repeated ids: an uncoalesced sparse gradient
    with gradwatch.watch(model, opt, sample_every=1, warn=False) as watch:
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids), torch.tensor([0, 2])).backward()
        dense = model[0].weight.grad.to_dense()
        opt.step()
        series = watch.series()
    col = series.column("0")
    assert series.metrics["grad_norm"][0, col] == pytest.approx(dense.norm().item(), rel=1e-6)
    assert series.metrics["grad_max"][0, col] == pytest.approx(dense.abs().max().item(), rel=1e-6)


def test_nonfinite_entries_counted_exactly():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with gradwatch.watch(model) as watch:
        model(torch.randn(2, 3)).sum().backward()
        # poison two entries of the first layer's gradient after a normal backward
        model[0].weight.grad[0, :2] = float("nan")
        model.zero_grad(set_to_none=False)
        model[0].weight.register_hook(lambda g: torch.where(torch.arange(3) < 2, float("nan"), g))
        model(torch.randn(2, 3)).sum().backward()
        series = watch.series()
    assert series.metrics["nonfinite"][1, series.column("0")] == 6  # 2 columns x 3 rows
    assert series.metrics["nonfinite"][1, series.column("1")] == 0
    assert np.isinf(series.metrics["grad_norm"][1, series.column("0")])  # measured NaN is stored as +inf


@pytest.mark.parametrize("bad", [42, "model", None])
def test_watch_rejects_a_non_module(bad):
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        gradwatch.watch(bad)


def test_watch_rejects_a_model_with_nothing_to_train():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        gradwatch.watch(model)
    assert torch.autograd.backward.__module__ == "torch.autograd"  # nothing left patched


@pytest.mark.parametrize("kwargs", [{"every": 0}, {"sample_every": -1}, {"flush_every": 1.5}])
def test_watch_rejects_bad_schedules(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        gradwatch.watch(nn.Linear(2, 2), **kwargs)


def test_watch_rejects_an_out_it_cannot_write(tmp_path):
    """Said when watch() is called, not from inside optimizer.step() at the first flush."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="out=.*cannot create the run directory"):
        gradwatch.watch(nn.Linear(2, 2), out=blocker / "run")
    assert torch.autograd.backward.__module__ == "torch.autograd"


def test_every_records_a_strided_subset():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, every=3) as watch:
        for _ in range(10):
            opt.zero_grad()
            model(torch.randn(4, 2)).sum().backward()
            opt.step()
        series = watch.series()
    assert list(series.steps) == [0, 3, 6, 9]


def test_zero_code_overflow_before_the_first_optimizer_step_is_skipped_not_a_step(tmp_path):
    """A GradScaler whose first iterations overflow: the optimizer has not stepped yet, so the
    zero-code watch does not know it; those iterations must still not become steps."""
    import math

    from gradwatch.collect.auto import AutoWatch
    from gradwatch.store import read_run

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    watch = AutoWatch(str(tmp_path), warn=False)
    try:
        for i in range(8):
            opt.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            if i < 3:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    finally:
        watch.detach()
    run = read_run(tmp_path)
    assert list(run.steps) == [0, 1, 2, 3, 4] and run.meta["skipped_steps"] == [0, 0, 0]
    assert all(math.isfinite(v) for v in run.metrics["grad_norm"][:, 0])


def _accumulating(watch_factory, steps=6, accumulate=3):
    """A loop that accumulates gradients over `accumulate` backwards per optimizer step, watched
    by `watch_factory(model, opt)`; returns what the watch recorded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = watch_factory(model, opt)
    try:
        for i in range(steps * accumulate):
            (model(torch.randn(8, 4)).pow(2).mean() / accumulate).backward()
            if i % accumulate == accumulate - 1:
                opt.step()
                opt.zero_grad()
    finally:
        watch.detach()
    return watch.stored_series()


def test_zero_code_gradient_accumulation_steps_with_the_optimizer(tmp_path):
    """Backwards that accumulate before the first optimizer step are not updates by hand: the zero-
    code watch records what gw.watch(model, optimizer) records (it took the first two backwards
    for two hand-written steps, skipped a step number, and saw 'weights that stopped changing')."""
    import gradwatch as gw
    from gradwatch.collect.auto import AutoWatch

    auto = _accumulating(lambda m, o: AutoWatch(str(tmp_path), warn=False, sample_every=1))
    explicit = _accumulating(lambda m, o: gw.watch(m, o, sample_every=1, warn=False))
    assert list(auto.steps) == list(explicit.steps) == list(range(6))
    np.testing.assert_array_equal(auto.loss, explicit.loss)
    np.testing.assert_array_equal(auto.metrics["update_ratio"], explicit.metrics["update_ratio"])
    assert (auto.metrics["update_ratio"][:, 0] > 0).all()


def test_optimizer_step_with_a_closure_records_the_update_and_can_stop_before_it():
    """Lightning calls optimizer.step(closure): forward and backward run inside the step."""
    import gradwatch as gw
    from gradwatch.errors import TrainingStopped

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with gw.watch(model, opt, sample_every=1, warn=False) as w:
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt.step(closure)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        run = w.series()
    expected = float((after - before).norm() / before.norm())
    assert run.metrics["update_ratio"][0, 0] == pytest.approx(expected, rel=1e-5)

    def bad_closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean() * float("nan")
        loss.backward()
        return loss

    lbfgs = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    with gw.watch(model, lbfgs, warn=False) as w:
        returned = [lbfgs.step(closure).item() for _ in range(3)]
        run = w.series()
    assert list(run.loss) == pytest.approx(returned)  # what step() returns: not a mean over line-search points

    kept = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TrainingStopped):
        with gw.watch(model, opt, stop_on=("non_finite",), warn=False):
            opt.step(bad_closure)
    assert all(torch.equal(a, p) for a, p in zip(kept, model.parameters()))


def test_lbfgs_records_the_gradient_of_its_first_closure_call_the_one_of_its_loss():
    """LBFGS calls the closure again at line-search points, each time after zero_grad: the step's
    gradient is the first call's (at the weights before the step, the gradient of the loss
    step() returns), not the last point's, and so are its activations. Two backwards in one call
    still accumulate."""
    import gradwatch as gw

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 80), nn.Tanh(), nn.Linear(80, 1))  # a large and small gradients
    x, y = torch.randn(32, 64), torch.randn(32, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    steps = []  # torch's own norms of layers 0 and 2, at each closure call of each step

    def closure():
        opt.zero_grad()
        out = model(x)
        loss = nn.functional.mse_loss(out, y)
        loss.backward(retain_graph=True)
        out.abs().mean().mul(0.1).backward()  # a second term, accumulated into the same gradients
        steps[-1].append([torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in m.parameters()]))
                          .item() for m in (model[0], model[2])])
        return loss

    tanh = []  # the mean of the activation's output at each call
    hook = model[1].register_forward_hook(lambda m, a, out: tanh.append(out.mean().item()))
    with gw.watch(model, opt, sample_every=2, warn=False) as w:
        for _ in range(3):
            steps.append([])
            tanh.append(None)
            opt.step(closure)
        run = w.series()
    hook.remove()
    assert all(len(calls) > 1 for calls in steps)  # LBFGS did evaluate further points
    firsts_act = [tanh[i + 1] for i, v in enumerate(tanh) if v is None]
    assert run.metrics["act_mean"][[0, 2], run.column("1")] == pytest.approx(firsts_act[::2], rel=1e-6)
    names = [l.name for l in run.layers]
    got = run.metrics["grad_norm"][:, [names.index("0"), names.index("2")]]
    firsts = [calls[0] for calls in steps]
    np.testing.assert_allclose(got, np.array(firsts), rtol=1e-5)


def test_zero_code_gan_two_alternating_optimizers(tmp_path):
    """G and D, each with its own optimizer, stepping in turn: each update is in some step's Δw
    (the generator's was measured as 0, a false 'weights stopped changing'), one step per
    iteration, and the step's loss is the sum of the two."""
    from gradwatch.collect.auto import AutoWatch

    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    D = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    bce = nn.BCEWithLogitsLoss()
    watch = AutoWatch(str(tmp_path), warn=False, sample_every=2)
    losses = []
    try:
        for _ in range(30):
            real, z = torch.randn(16, 2) + 3, torch.randn(16, 2)
            fake = G(z)
            opt_d.zero_grad()
            loss_d = bce(D(real), torch.ones(16, 1)) + bce(D(fake.detach()), torch.zeros(16, 1))
            loss_d.backward()
            opt_d.step()
            opt_g.zero_grad()
            loss_g = bce(D(fake), torch.ones(16, 1))
            loss_g.backward()
            opt_g.step()
            losses.append((loss_d.item(), loss_g.item()))
    finally:
        watch.detach()
    run = watch.stored_series()
    assert len(run.steps) == 31  # one per D step, and the last G step's, closed by detach
    g_cols = [run.column(n) for n in run.layer_names("param") if not n.startswith("D.")]  # D: as the script calls it
    assert len(g_cols) == 2
    sampled = run.metrics["update_ratio"][::2]
    assert (sampled[1:, g_cols] > 0).all()  # the generator's update is seen (step 0 has only D's)
    # step k holds G's update of iteration k-1 and D's of iteration k: its loss is their sum
    assert run.loss[5] == pytest.approx(losses[4][1] + losses[5][0], rel=1e-5)
    from gradwatch.diagnose import diagnose
    assert not [f for f in diagnose(run) if f.kind == "stalled_layers"]
    # G steps after a backward of its own: the step's loss mixes two objectives, so no loss findings
    assert run.meta["own_loss_steps"] == [1]
    run.loss[:] = 0.7  # a GAN's flat mixed loss
    assert not [f for f in diagnose(run) if f.kind in ("loss_plateau", "loss_divergence")]


def test_zero_code_second_phase_with_a_new_model_and_optimizer(tmp_path):
    """A teacher trained first, then a student with its own optimizer: the student is discovered
    and its steps are recorded (they were folded into one step of the teacher's optimizer), the
    first one too (it was merged into the second)."""
    from gradwatch.collect.auto import AutoWatch

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    student = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    watch = AutoWatch(str(tmp_path), warn=False, sample_every=1)
    student_losses = []
    try:
        for model, n in ((teacher, 10), (student, 12)):
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            for _ in range(n):
                opt.zero_grad()
                loss = model(torch.randn(8, 4)).pow(2).mean()
                loss.backward()
                opt.step()
                if model is student:
                    student_losses.append(loss.item())
    finally:
        watch.detach()
    run = watch.stored_series()
    assert list(run.steps) == list(range(10 + 12))
    assert run.loss[10:] == pytest.approx(student_losses, rel=1e-6)
    assert run.meta["phase_starts"] == [10] and run.meta["own_loss_steps"] == []
    student_cols = [run.column(n) for n in run.layer_names("param") if n.startswith("student.")]
    assert len(student_cols) == 2 and (run.metrics["update_ratio"][-5:, student_cols] > 0).all()


def test_zero_code_two_optimizers_stepped_after_one_backward(tmp_path):
    """SparseAdam for the embedding and Adam for the head, stepped one after the other: the second
    one's update was seen by no step (a false 'weights stopped changing' for the head)."""
    from gradwatch.collect.auto import AutoWatch

    torch.manual_seed(0)
    emb, head = nn.Embedding(50, 8, sparse=True), nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt_s, opt_d = torch.optim.SparseAdam(list(emb.parameters()), 1e-2), torch.optim.Adam(head.parameters(), 1e-3)
    watch = AutoWatch(str(tmp_path), warn=False, sample_every=3)
    try:
        for _ in range(12):
            ids = torch.randint(0, 50, (16, 4))
            loss = nn.functional.cross_entropy(head(emb(ids).mean(1)), ids[:, 0] % 2)
            opt_s.zero_grad(), opt_d.zero_grad()
            loss.backward()
            opt_s.step(), opt_d.step()
    finally:
        watch.detach()
    run = watch.stored_series()
    assert len(run.steps) == 12 and run.meta["own_loss_steps"] == []  # one loss, two optimizers
    head_cols = [run.column(n) for n in run.layer_names("param") if n != "Embedding"]
    assert len(head_cols) == 2 and (run.metrics["update_ratio"][3::3, :][:, head_cols] > 0).all()


@pytest.mark.parametrize("given", ["add_param_group", "held_all_along"])
def test_a_backbone_unfrozen_mid_run_is_watched_from_when_the_optimizer_gets_it(given):
    """Fine-tuning: the head trains first, then the backbone is unfrozen. Given to the optimizer
    then (add_param_group), its layers are recorded from that step on; unfrozen in an optimizer that
    held it all along (nothing tells but requires_grad), from the step after (it was from the next
    flush: up to 50 steps unrecorded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 1))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[2].parameters() if given == "add_param_group" else model.parameters(), lr=0.01)
    torchs = []
    with gradwatch.watch(model, opt, flush_every=10, warn=False) as watch:
        for step in range(40):
            if step == 15:
                model[0].requires_grad_(True)
                if given == "add_param_group":
                    opt.add_param_group({"params": model[0].parameters()})
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            g = model[0][0].weight.grad
            torchs.append(math.hypot(torch.linalg.vector_norm(g).item(), torch.linalg.vector_norm(model[0][0].bias.grad).item())
                          if g is not None else math.nan)
            opt.step()
        run = watch.series()
    assert {"0.0", "0.2"} <= set(run.layer_names("param"))
    grad = run.metrics["grad_norm"][:, run.column("0.0")]
    first = 15 if given == "add_param_group" else 16  # (seen unfrozen at the end of step 15)
    assert np.isnan(grad[:first]).all() and (grad[first:] > 0).all()
    np.testing.assert_allclose(grad[first:], torchs[first:], rtol=1e-5)
    assert (run.metrics["grad_norm"][:, run.column("2")] > 0).all()
    assert run.layer_names()[:3] == ["0.0", "0.1", "0.2"]  # below the head, in forward order


def test_a_compiled_model_keeps_its_sampled_statistics_after_a_new_batch_shape():
    """torch.compile does not guard on module hooks by default: the graph compiled for the epoch's
    smaller last batch (an unsampled step, hooks off) never called them again. Losses stay
    bit-identical to the unwatched compiled run."""
    from torch._dynamo import config as dynamo_config, reset as dynamo_reset

    def train(watched: bool):
        dynamo_reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        compiled = torch.compile(model, backend="eager")
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        watch = gradwatch.watch(model, opt, sample_every=10, warn=False) if watched else None
        losses = []
        for step in range(32):
            opt.zero_grad()
            loss = compiled(torch.randn(5 if step == 16 else 32, 8)).pow(2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        run = watch.series() if watched else None
        if watched:
            watch.detach()
        return losses, run

    plain, _ = train(False)
    losses, run = train(True)
    assert losses == plain
    for name in ("1", "3"):
        recorded = run.steps[np.isfinite(run.metrics["act_std"][:, run.column(name)])]
        assert list(recorded) == [0, 10, 20, 30]
    assert dynamo_config.skip_nnmodule_hook_guards  # put back when the watch detached


@pytest.mark.parametrize("given", ["compiled", "model"])
def test_a_compiled_model_runs_its_whole_graph_between_samples(given):
    """gw.watch(torch.compile(model)), or gw.watch(model) with the compiled wrapper called:
    layers named as the model's own, the losses of the unwatched compiled run, and the steps
    between samples in one compiled graph, not the graph per module that the sampled step's
    hooks break it into."""
    from torch._dynamo import reset as dynamo_reset
    from torch.profiler import profile

    def train(watched: bool):
        dynamo_reset()
        torch.manual_seed(0)
        compiled = torch.compile(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                                               nn.Linear(16, 1)), backend="aot_eager")
        opt = torch.optim.SGD(compiled.parameters(), lr=0.01)
        watched_model = compiled if given == "compiled" else compiled._orig_mod
        watch = gradwatch.watch(watched_model, opt, sample_every=5, warn=False) if watched else None
        losses = []
        for step in range(13):
            with profile() as prof:
                opt.zero_grad()
                loss = compiled(torch.randn(32, 8)).pow(2).mean()
                loss.backward()
                opt.step()
            losses.append(loss.item())
        graphs = sum(e.name == "CompiledFunction" for e in prof.events())  # step 12: not sampled
        names = [layer.name for layer in watch.layers] if watched else None
        if watched:
            watch.detach()
        return losses, graphs, names

    plain, plain_graphs, _ = train(False)
    losses, graphs, names = train(True)
    assert losses == plain and graphs == plain_graphs == 1
    assert names == ["0", "1", "2", "3", "4"]


class HandWritten(nn.Module):
    """A deep net written by hand: weights in ParameterLists, bare parameters, a Linear head."""

    def __init__(self, depth=4):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(3, 8) / 3 ** 0.5)
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(8, 8) / 8 ** 0.5) for _ in range(depth)])
        self.bs = nn.ParameterList([nn.Parameter(torch.zeros(8)) for _ in range(depth)])
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(x @ self.w_in)
        for w, b in zip(self.ws, self.bs):
            h = torch.sigmoid(h @ w + b)
        return self.out(h)


def test_hand_written_weights_are_layers_in_the_order_they_are_used():
    """Each weight of a ParameterList is a layer (one lumped norm would hide a gradient vanishing
    across them); weights used functionally are placed by the first backward (gradients arrive in
    reverse order of use), below the head they were numbered above."""
    torch.manual_seed(0)
    model = HandWritten()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, warn=False) as watch:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 3)).pow(2).mean().backward()
            opt.step()
        run = watch.series()
    # the model's own bare weight is named by its key: named "HandWritten", a finding in it read
    # as one about the whole model
    assert run.layer_names() == ["w_in", "ws.0", "bs.0", "ws.1", "bs.1", "ws.2", "bs.2", "ws.3", "bs.3", "out"]
    ws0 = run.metrics["grad_norm"][-1, run.column("ws.0")]
    assert ws0 == pytest.approx(model.ws[0].grad.norm().item(), rel=1e-5)  # its own norm, not the list's


def test_lazy_modules_and_weight_parametrizations(tmp_path):
    """nn.LazyLinear has no shape before its first forward (hooking it raised inside the user's
    forward): zero-code watching takes the model at a later step, gw.watch says what to do. A
    spectral_norm parametrization computed while the model is built is part of its layer, not a
    model of its own (it was watched as one, numbered first)."""
    from torch.nn.utils.parametrizations import spectral_norm

    from gradwatch.collect.auto import AutoWatch

    with pytest.raises(ConfigError, match="uninitialised parameters .*run one forward pass first"):
        gradwatch.watch(nn.Sequential(nn.LazyLinear(4), nn.ReLU()))
    watch = AutoWatch(str(tmp_path), warn=False)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), spectral_norm(nn.Linear(16, 1)))
        opt = None
        for _ in range(5):
            out = model(torch.randn(8, 5))
            opt = opt or torch.optim.SGD(model.parameters(), lr=0.01)
            opt.zero_grad()
            out.pow(2).mean().backward()
            opt.step()
    finally:
        watch.detach()
    run = watch.stored_series()
    assert run.layer_names() == ["0", "1", "2"]  # (its originals are the layer's, one layer: test_watch_unit_axis)
    assert np.isfinite(run.metrics["grad_norm"][1:, run.column("0")]).all()


def test_zero_code_an_optimizer_that_stops_on_purpose_is_no_stalled_layer(tmp_path):
    """An encoder's warm-up optimizer stops after 20 steps while the head's goes on: the head's
    becomes the step's optimizer, but the same model trains on, so the run is one phase; and the
    encoder's weights stop changing on purpose, which is no 'give the optimizer every parameter'
    error."""
    from gradwatch.collect.auto import AutoWatch
    from gradwatch.diagnose import diagnose

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    enc = torch.optim.SGD([*model[0].parameters(), *model[2].parameters()], 0.05)
    head = torch.optim.SGD(model[4].parameters(), 0.05)
    watch = AutoWatch(str(tmp_path), warn=False, sample_every=2)
    x = torch.randn(64, 4)
    y = x.sum(1, keepdim=True)
    try:
        for step in range(80):
            enc.zero_grad(), head.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if step < 20:
                enc.step()
            head.step()
    finally:
        watch.detach()
    run = watch.stored_series()
    assert len(run.steps) >= 79 and run.meta["phase_starts"] == []
    assert [names for _, names in run.meta["optimizer_stopped"]] == [["0", "2"]]
    assert not [f for f in diagnose(run) if f.kind == "stalled_layers"]
    run.meta["optimizer_stopped"] = []
    assert [f for f in diagnose(run) if f.kind == "stalled_layers"]  # what it said before


def test_a_full_disk_stops_the_recording_not_the_training(tmp_path, monkeypatch, capsys):
    """sqlite's 'database or disk is full' raised out of optimizer.step(): monitoring must never
    end the training it watches."""
    import sqlite3

    from gradwatch.store import writer

    real, calls = writer.RunStoreWriter.write, []

    def full(self, batch):
        calls.append(1)
        if len(calls) > 2:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, batch)

    monkeypatch.setattr(writer.RunStoreWriter, "write", full)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gradwatch.watch(model, opt, out=tmp_path, warn=False, flush_every=5)
    for _ in range(40):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
    assert len(watch.stored_series().steps) == 10  # the two flushes before the disk filled
    watch.detach()
    said = [line for line in capsys.readouterr().err.splitlines() if "recording stops here, training goes on" in line]
    assert sum(str(tmp_path) in line for line in said) == 1  # (a watch another test left attached may say it too)


def test_a_finite_gradient_beyond_float32s_range_is_no_non_finite_step():
    """Entries of 1e37 are finite; their norm (6.4e38) is not in float32. It is kept at float32's
    largest value, and stop_on=('non_finite',) did stop the training at it."""
    model = nn.Linear(64, 64, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    watch = gradwatch.watch(model, opt, warn=False, stop_on=("non_finite",))
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(1, 64)).sum().mul(1e37 / 1.0).backward()
        opt.step()
    run = watch.series()
    watch.detach()
    g = run.series("0" if "0" in run.layer_names() else run.layer_names()[0], "grad_norm")[1]
    assert np.isfinite(g).all() and (g == torch.finfo(torch.float32).max).all()
    assert "non_finite" not in {f.kind for f in gradwatch.diagnose(run)}


def test_a_watch_of_an_unwrapped_model_among_several_ranks_says_whose_gradients_it_stores(tmp_path, monkeypatch, capsys):
    """gw.watch before init_process_group and DDP(...) stored each rank's local gradients (0.83 for
    the synchronised 1.33), silently."""
    import torch.distributed as dist

    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gradwatch.watch(model, opt, warn=False, out=tmp_path / "s.sqlite")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    for _ in range(3):
        opt.zero_grad(), model(torch.randn(8, 4)).sum().backward(), opt.step()
    watch.detach()
    assert "2 ranks, and the watched model is not a DDP/FSDP module" in capsys.readouterr().err


def test_halves_frozen_in_turns_do_not_flush_every_step(monkeypatch):
    """Block-coordinate training (one half frozen on alternate steps, one optimizer): a parameter
    already hooked keeps its hook, so unfreezing it again is nothing new (it flushed every step)."""
    from gradwatch.collect.watch import Watch

    flushes = []
    flush = Watch.flush
    monkeypatch.setattr(Watch, "flush", lambda self: (flushes.append(1), flush(self))[1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, flush_every=50, warn=False):
        for step in range(100):
            model[0].requires_grad_(step % 2 == 0)
            model[2].requires_grad_(step % 2 == 1)
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    assert len(flushes) <= 4, len(flushes)
