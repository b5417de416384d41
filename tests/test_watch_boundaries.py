"""Where a step and a layer begin when a script does more than train one model: a second phase on a
frozen backbone, layers run on their own before the model, a backward no optimizer step uses, and
activations turned NaN."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.collect.auto import AutoWatch
from gradwatch.collect.stats import activation_stats
from gradwatch.diagnose import diagnose


class Net(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def _pretrain_then_finetune(fine_tune_lr: float):
    """Pretrain a Net, freeze its backbone, train a new Net's head on it with an optimizer of its
    own: the losses, the new head's weight norm before its first update, the new Net."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    backbone = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
    losses = []

    def train(model, params, steps, lr):
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())

    pretrained = Net(backbone)
    train(pretrained, pretrained.parameters(), 12, 1e-2)
    backbone.requires_grad_(False)
    tuned = Net(backbone)
    w0 = torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in tuned.head.parameters()])).item()
    train(tuned, tuned.head.parameters(), 30, fine_tune_lr)
    return losses, w0, tuned


def test_zero_code_second_phase_on_a_frozen_shared_backbone(tmp_path, capsys):
    """A hook was put on the frozen backbone (torch refuses: the new model went unwatched), the
    phase's first two steps were one (its optimizer was taken for the step's only at its second),
    and 'trains on a loss of its own' (a GAN's) turned the loss rules off. The new head is watched
    from the phase's first step, a sampled one, so its weights' growth under lr 1 is recorded (a
    7.5x jump in three steps, then slowing: no longer an exploding_gradient, whose weight-growth
    branch asks for growth that keeps its pace; the loss ends below lr 1e-2's)."""
    plain, _, plain_model = _pretrain_then_finetune(1.0)
    watch = AutoWatch(str(tmp_path), warn=False, sample_every=5)
    try:
        losses, w0, model = _pretrain_then_finetune(1.0)
    finally:
        watch.detach()
    assert losses == plain and torch.equal(model.head.weight, plain_model.head.weight)
    assert "not watching" not in capsys.readouterr().err
    run = watch.stored_series()
    assert list(run.steps) == list(range(42)) and run.loss == pytest.approx(losses, rel=1e-6)
    assert run.meta["phase_starts"] == [12] and run.meta["own_loss_steps"] == []
    head = run.column("model.head")  # the second model, by the name train() calls it
    assert np.isfinite(run.metrics["grad_norm"][12:, head]).all()
    assert run.metrics["weight_norm"][12, head] == pytest.approx(w0, rel=1e-6)  # before its first update
    assert np.nanmax(run.metrics["weight_norm"][:, head]) > 10 * w0


def test_zero_code_a_new_optimizer_for_the_same_model_is_no_gan_partner(tmp_path):
    """An optimizer made anew each epoch (a schedule by hand): its first step was merged into its
    second and taken for a GAN partner's ('own_loss': no loss findings for the whole run)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(32, 4)
    watch = AutoWatch(str(tmp_path), warn=False)
    losses = []
    try:
        for epoch in range(3):
            opt = torch.optim.SGD(model.parameters(), lr=0.01 / (epoch + 1))
            for _ in range(5):
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
    finally:
        watch.detach()
    run = watch.stored_series()
    assert run.loss == pytest.approx(losses, rel=1e-6)
    assert run.meta["own_loss_steps"] == [] and run.meta["phase_starts"] == []


def test_zero_code_a_model_whose_pieces_ran_first_keeps_its_layer_names(tmp_path):
    """Its layers run one by one, its head on its own and a slice `model[:2]` before the model: they
    were taken for models of their own (layers named 'Linear', 'Sequential.2', one lost to a clash
    of names, step 0 without their statistics). Named and numbered as when the model runs first."""

    def layers_at_step_0(pieces_first: bool, run_dir) -> dict:
        """{name: (index, act_mean, grad_norm)} at step 0."""
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        watch = AutoWatch(str(run_dir), warn=False)
        try:
            if pieces_first:
                with torch.no_grad():
                    model[4](torch.randn(3, 8))
                    h = x
                    for m in model:
                        h = m(h)
                    model[:2](x)
            for _ in range(3):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        finally:
            watch.detach()
        run = watch.stored_series()
        act, grad = run.metrics["act_mean"][0], run.metrics["grad_norm"][0]
        return {l.name: (l.index, act[c], grad[c]) for c, l in enumerate(run.layers)}

    run_dir = tmp_path / "pieces"
    run_dir.mkdir()
    layers, expected = layers_at_step_0(True, run_dir), layers_at_step_0(False, tmp_path)
    assert sorted((i, name) for name, (i, _, _) in layers.items()) == [(k, str(k)) for k in range(5)]
    for name, (index, act, grad) in expected.items():  # activations (1, 3) and weights (0, 2, 4) at step 0
        np.testing.assert_array_equal(layers[name], (index, act, grad))


def test_zero_code_two_bare_layers_of_one_type_keep_two_names(tmp_path):
    """Two models that are each one nn.Linear: both were named 'Linear', and one was lost. The
    second is named as the script calls it (it was 'Linear_')."""
    enc, dec = nn.Linear(4, 4), nn.Linear(4, 1)
    opt = torch.optim.SGD([*enc.parameters(), *dec.parameters()], lr=0.1)
    watch = AutoWatch(str(tmp_path), warn=False)
    try:
        for _ in range(2):
            opt.zero_grad()
            dec(enc(torch.randn(8, 4))).pow(2).mean().backward()
            opt.step()
    finally:
        watch.detach()
    assert watch.stored_series().layer_names() == ["Linear", "dec"]


def test_a_nan_unit_is_not_dead():
    """A unit is dead when its output is exactly 0 for the whole batch: NaN is not 0 (every ReLU of
    a run gone NaN was counted dead, a false '100% of the units' error)."""
    y = torch.zeros(16, 4)
    y[:, 1] = math.nan
    y[3, 2] = math.nan
    y[:, 3] = 1.0
    assert activation_stats(y, "relu")[3].item() == 0.25  # only unit 0
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with gw.watch(model, sample_every=1, warn=False) as watch:
        model(torch.full((16, 4), math.nan)).sum().backward()
        run = watch.series()
    assert run.metrics["dead"][0, run.column("1")] == 0.0


def _check_train_check(watch_factory, steps=6):
    """An input-gradient check before training and after it, around `steps` optimizer steps, the
    last of them accumulating two backwards (and a third, never stepped: zero_grad drops it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def check():
        x = torch.randn(16, 4, requires_grad=True)
        model(x).pow(2).mean().backward()
        model.zero_grad()
        return x.grad

    watch = watch_factory(model, opt)
    losses = []
    try:
        check()
        for step in range(steps):
            parts = 2 if step == steps - 1 else 1
            if step == steps - 1:  # a micro-batch whose step never comes
                model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.zero_grad()
            batch = []
            for _ in range(parts):
                loss = model(torch.randn(8, 4)).pow(2).mean() / parts
                loss.backward()
                batch.append(loss.item())
            opt.step()
            losses.append(sum(batch))  # the step's objective: its micro-batches' mean loss
        check()
    finally:
        watch.detach()
    return losses, watch.stored_series()


@pytest.mark.parametrize("zero_code", [False, True])
def test_a_backward_no_optimizer_step_uses_is_no_step(tmp_path, zero_code):
    """A check before training was averaged into step 0, one after it became a step of its own;
    gradient accumulation goes on as before (its backwards do reach a step)."""
    factory = (lambda m, o: AutoWatch(str(tmp_path), warn=False, sample_every=1)) if zero_code \
        else (lambda m, o: gw.watch(m, o, sample_every=1, warn=False))
    losses, run = _check_train_check(factory)
    assert list(run.steps) == list(range(6))
    assert run.loss == pytest.approx(losses, rel=1e-6)


def test_each_watch_of_a_gan_records_its_own_models_loss():
    """A watch on the generator and one on the discriminator: the discriminator's backward reaches
    none of the generator's weights, yet its loss was summed into the generator's step (1.97, not
    its own 0.63), and the live warnings spoke of a plateau in that mix."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    D = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    oG, oD = torch.optim.Adam(G.parameters(), 2e-4), torch.optim.Adam(D.parameters(), 2e-4)
    bce = nn.BCEWithLogitsLoss()
    losses = {"G": [], "D": []}
    with gw.watch(G, oG, warn=False) as wG, gw.watch(D, oD, warn=False) as wD:
        for _ in range(12):
            real, fake = torch.randn(32, 2) + 2, G(torch.randn(32, 4))
            lD = bce(D(real), torch.ones(32, 1)) + bce(D(fake.detach()), torch.zeros(32, 1))
            oD.zero_grad(), lD.backward(), oD.step()
            lG = bce(D(fake), torch.ones(32, 1))
            oG.zero_grad(), lG.backward(), oG.step()
            losses["D"].append(lD.item()), losses["G"].append(lG.item())
        runs = {"G": wG.series(), "D": wD.series()}
    for name in ("G", "D"):
        np.testing.assert_allclose(runs[name].loss, losses[name], rtol=1e-6)


def test_zero_code_later_models_are_named_as_the_script_calls_them(tmp_path):
    """A trunk and two heads run one after the other: the heads were 'Linear' and 'Linear_', a
    trainer's `self.decoder` 'Sequential.0'. A model after the first is prefixed by its variable,
    or by the attribute of the object that holds it."""
    class Trainer:
        def __init__(self):
            self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
            self.decoder = nn.Sequential(nn.Linear(8, 4))

        def loss(self, x):
            return (self.decoder(self.encoder(x)) - x).pow(2).mean()

    trainer = Trainer()
    trunk, cls_head, rec_head = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 4)
    params = [*trainer.encoder.parameters(), *trainer.decoder.parameters(), *trunk.parameters(),
              *cls_head.parameters(), *rec_head.parameters()]
    opt = torch.optim.SGD(params, lr=0.01)
    watch = AutoWatch(str(tmp_path), warn=False)
    try:
        for _ in range(2):
            opt.zero_grad()
            x = torch.randn(8, 4)
            h = trunk(x)
            (trainer.loss(x) + cls_head(h).pow(2).mean() + rec_head(h).pow(2).mean()).backward()
            opt.step()
    finally:
        watch.detach()
    assert watch.stored_series().layer_names() == ["Linear", "encoder.0", "encoder.1", "decoder.0", "cls_head", "rec_head"]


def test_an_expert_given_no_token_is_not_a_nan():
    """A mixture of experts calls an expert on an empty batch when the router sends it no token:
    the mean of its empty ReLU output was NaN, stored as measured non-finite, so a healthy run got
    a non_finite error at step 0 and stop_on=("non_finite",) stopped it."""
    torch.manual_seed(0)
    experts = nn.ModuleList([nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2)])
    opt = torch.optim.SGD(experts.parameters(), lr=0.05)
    with gw.watch(experts, opt, warn=False, stop_on=("non_finite",), flush_every=5) as watch:
        for _ in range(10):
            x = torch.randn(16, 4)
            out = torch.cat([experts[0](x), experts[1](x[:0])])  # expert 1: no token
            opt.zero_grad()
            out.pow(2).mean().backward()
            opt.step()
        run = watch.series()
    assert "non_finite" not in [f.kind for f in diagnose(run)]
    assert np.isnan(run.metrics["act_mean"][:, run.column("1.1")]).all()  # not recorded: nothing ran


def test_a_watch_with_one_optimizer_sees_the_update_of_another_on_its_weights():
    """gw.watch(gan, opt_G) (and Lightning's callback, which watches the first of two optimizers)
    with D stepped by its own optimizer: D's update fell outside the measured Δw, its update ratio
    read 0, and a stalled_layers error said to give the optimizer every parameter."""
    torch.manual_seed(0)
    gan = nn.ModuleDict({"G": nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)),
                         "D": nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))})
    oG, oD = torch.optim.SGD(gan["G"].parameters(), 0.01), torch.optim.SGD(gan["D"].parameters(), 0.01)
    bce = nn.BCEWithLogitsLoss()
    with gw.watch(gan, oG, warn=False, sample_every=2) as watch:
        for _ in range(40):
            fake = gan["G"](torch.randn(32, 4))
            lD = bce(gan["D"](torch.randn(32, 2) + 2), torch.ones(32, 1)) + bce(gan["D"](fake.detach()), torch.zeros(32, 1))
            oD.zero_grad(), lD.backward(), oD.step()
            oG.zero_grad(), bce(gan["D"](fake), torch.ones(32, 1)).backward(), oG.step()
        run = watch.series()
    ratios = run.metrics["update_ratio"][::2, run.column("D.0")]
    assert (ratios[np.isfinite(ratios)] > 0).all()
    assert "stalled_layers" not in [f.kind for f in diagnose(run)]


@pytest.mark.parametrize("zero_code", [False, True])
def test_layers_in_no_optimizer_are_told_from_a_partners(tmp_path, zero_code):
    """Head-only fine-tuning with the backbone left requires_grad: its layers are in no optimizer
    (said as such, a warning); a GAN's discriminator, stepped by its own optimizer under a watch
    of the whole module, is in one."""
    torch.manual_seed(0)
    backbone, head, D = nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 2), nn.Linear(2, 1)
    model = nn.Sequential(backbone, head, D)
    oG, oD = torch.optim.SGD(head.parameters(), lr=0.1), torch.optim.SGD(D.parameters(), lr=0.1)
    watch = AutoWatch(str(tmp_path), warn=False) if zero_code else gw.watch(model, oG, warn=False)
    try:
        for _ in range(40):
            x = torch.randn(16, 4)
            oD.zero_grad(), model(x).pow(2).mean().backward(), oD.step()
            oG.zero_grad(), model(x).pow(2).mean().backward(), oG.step()
        run = watch.series()
    finally:
        watch.detach()
    assert run.meta["outside_optimizers"] == ["0.0"]
    f = next(f for f in gw.diagnose(run) if f.kind == "stalled_layers")
    assert f.severity == "warning" and f.layers == ("0.0",)


def test_zero_code_a_backbone_unfrozen_with_an_optimizer_of_its_own_is_the_models_layers(tmp_path):
    """Fine-tuning: a backbone frozen when the model was found is unfrozen, with an optimizer of its
    own stepping beside the head's. Its layers were recorded only from the next flush (up to
    flush_every steps later; in a short run never), and the new optimizer was taken for a new
    model's. They are the model's layers from that step, the same steps, and no phase begins."""
    torch.manual_seed(0)
    model = Net(nn.Sequential(nn.Linear(4, 16), nn.ReLU()))
    model.backbone.requires_grad_(False)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    watch = AutoWatch(str(tmp_path), warn=False)
    losses, torchs = [], []
    try:
        opt, opt2 = torch.optim.Adam(model.head.parameters(), lr=1e-2), None
        for step in range(12):
            if step == 5:
                model.backbone.requires_grad_(True)
                opt2 = torch.optim.SGD(model.backbone.parameters(), lr=1e-2)
            loss = nn.functional.cross_entropy(model(x), y)
            for o in filter(None, (opt, opt2)):
                o.zero_grad()
            loss.backward()
            g = model.backbone[0].weight.grad
            torchs.append(math.nan if g is None else math.hypot(
                torch.linalg.vector_norm(g).item(), torch.linalg.vector_norm(model.backbone[0].bias.grad).item()))
            for o in filter(None, (opt, opt2)):
                o.step()
            losses.append(loss.item())
    finally:
        watch.detach()
    run = watch.stored_series()
    assert list(run.steps) == list(range(12)) and run.loss == pytest.approx(losses, rel=1e-6)
    assert run.meta["phase_starts"] == [] and run.meta["own_loss_steps"] == []
    np.testing.assert_allclose(run.metrics["grad_norm"][:, run.column("backbone.0")], torchs, rtol=1e-5)


@pytest.mark.parametrize("beside", [None, "before", "after"])
def test_a_watched_optimizer_made_anew_mid_run_is_followed(beside):
    """gw.watch(model, opt), then `opt = Adam(model.parameters())` (another optimizer to fine-tune,
    a schedule by hand): every later step went unrecorded, silently. The new one defines the step
    from its first; one made beside the old one, which steps on (before or after it), partners it:
    one step per iteration either way, each with torch's own gradient norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    old, losses, torchs = opt, [], []
    with gw.watch(model, opt, sample_every=3, warn=False) as w:
        for step in range(9):
            if step == 4:
                opt = torch.optim.Adam(model.parameters() if beside is None else model[2].parameters(), lr=1e-3)
            order = [opt] if beside is None or step < 4 else ([opt, old] if beside == "before" else [old, opt])
            loss = model(x).pow(2).mean()
            for o in order:
                o.zero_grad()
            loss.backward()
            torchs.append(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model[0].parameters()])).item())
            for o in order:
                o.step()
            losses.append(loss.item())
        run = w.series()
    assert list(run.steps) == list(range(9)) and run.loss == pytest.approx(losses, rel=1e-6)
    np.testing.assert_allclose(run.metrics["grad_norm"][:, run.column("0")], torchs, rtol=1e-5)
    assert (run.metrics["update_ratio"][[0, 3, 6], run.column("2")] > 0).all()


def test_zero_code_a_model_run_with_gradients_off_is_not_the_model_that_trains(tmp_path):
    """A mean teacher (a copy of the student, run under torch.no_grad() first each step, updated
    by EMA): it was found first and took the plain names, its layers recorded with no gradient
    and said to be outside every optimizer, while the student's were 'student.0'. A forward with
    gradients off trains nothing: the student is the model."""
    import copy

    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    teacher = copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    watch = AutoWatch(str(tmp_path), warn=False)
    torchs = []
    try:
        for _ in range(4):
            with torch.no_grad():
                target = teacher(x).softmax(1)
            out = student(x)
            loss = nn.functional.cross_entropy(out, y) + nn.functional.mse_loss(out.softmax(1), target)
            opt.zero_grad()
            loss.backward()
            torchs.append(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in student[0].parameters()])).item())
            opt.step()
            with torch.no_grad():
                for pt, ps in zip(teacher.parameters(), student.parameters()):
                    pt.lerp_(ps, 0.01)
    finally:
        watch.detach()
    run = watch.stored_series()
    assert run.layer_names() == ["0", "1", "2"]
    np.testing.assert_allclose(run.metrics["grad_norm"][:, run.column("0")], torchs, rtol=1e-5)
    assert run.meta["outside_optimizers"] == []


def test_zero_code_an_rnn_called_directly_has_its_time_profile_at_step_0(tmp_path):
    """The RNN is the model (no wrapper): found inside its own call, its input hook was registered
    after torch took its pre-hooks for that call, so step 0, where an exploding RNN's blow-up
    starts, had no time profile. Compared with ∂L/∂x_t from torch, and the losses unchanged."""
    from gradwatch.collect.stats import time_profile

    def train(watched):
        torch.manual_seed(0)
        rnn, head = nn.RNN(3, 8, batch_first=True), nn.Linear(8, 1)
        opt = torch.optim.SGD([*rnn.parameters(), *head.parameters()], lr=0.05)
        watch = AutoWatch(str(tmp_path), warn=False, sample_every=5) if watched else None
        losses, first_profile = [], None
        try:
            for step in range(6):
                x = torch.randn(4, 12, 3, requires_grad=step == 0 and not watched)
                out, _ = rnn(x)
                loss = head(out[:, -1]).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                if x.grad is not None:
                    first_profile = time_profile(x.grad, 1)
                opt.step()
                losses.append(loss.item())
        finally:
            if watch is not None:
                watch.detach()
        return losses, first_profile, watch

    plain, reference, _ = train(False)
    losses, _, watch = train(True)
    assert losses == plain
    steps, profile = watch.stored_series().time_profiles["RNN"]
    assert list(steps) == [0, 5]
    np.testing.assert_allclose(profile[0], reference.numpy(), rtol=1e-5)


def test_a_schedule_that_ends_at_lr_0_does_not_put_the_layers_outside_the_optimizer(tmp_path):
    """A linear decay to 0 (Hugging Face's default) sets lr 0 after the last step; the final flush,
    at detach, had read that lr and said every layer was in no optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 12
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    watch = gw.watch(model, opt, warn=False, out=tmp_path / "s.sqlite", flush_every=100)
    for _ in range(steps):
        opt.zero_grad(), model(torch.randn(16, 4)).pow(2).mean().backward(), opt.step(), sched.step()
    assert opt.param_groups[0]["lr"] == 0
    watch.detach()
    assert watch.stored_series().meta["outside_optimizers"] == []
