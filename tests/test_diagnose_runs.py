"""A short real training run per kind of finding, and live use (on_finding, stop_on)."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose
from gradwatch.errors import ConfigError


def mlp(depth=6, width=32, act=nn.ReLU, d_in=16, d_out=4):
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, d_out))


def data(n=64, d_in=16, d_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    return x, torch.randint(0, d_out, (n,), generator=g)


def train(model, opt, steps=60, x=None, y=None, loss_fn=nn.functional.cross_entropy, **watch_kw):
    if x is None:
        x, y = data()
    watch_kw.setdefault("warn", False)
    with gw.watch(model, opt, **watch_kw) as w:
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        return w, w.series()


def batches_with_nan(x, steps, at):
    """`x` at each step, with one entry NaN at the steps in `at` (a bad batch)."""
    for step in range(steps):
        batch = x.clone()
        if step in at:
            batch[0, 0] = float("nan")
        yield step, batch


def kinds(run):
    return {f.kind for f in diagnose(run)}


def test_deep_sigmoid_net_vanishes():
    torch.manual_seed(0)
    model = mlp(depth=8, act=nn.Sigmoid)
    _, run = train(model, torch.optim.SGD(model.parameters(), lr=0.1))
    found = diagnose(run)
    v = next(f for f in found if f.kind == "vanishing_gradient")
    assert v.first_step == 0 and v.layers[0] == "0"
    assert v.causes[0].startswith("saturating activation")
    # every remedy's code runs as printed, given the model and one input batch (add_residual
    # was printed without the example_input it requires)
    for remedy in v.remedies:
        scope = {"gw": gw, "nn": nn, "torch": torch, "model": mlp(depth=8, act=nn.Sigmoid), "batch": data()[0]}
        exec(remedy.code, scope)


def test_he_relu_net_of_the_same_depth_is_healthy():
    torch.manual_seed(0)
    model = mlp(depth=8, act=nn.ReLU)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    _, run = train(model, torch.optim.SGD(model.parameters(), lr=0.05), steps=100)
    assert diagnose(run) == []


def test_too_high_learning_rate_explodes_before_the_nan():
    torch.manual_seed(0)
    model = mlp(depth=3, act=nn.ReLU, d_out=1)
    x = torch.randn(64, 16)
    y = x.sum(1, keepdim=True)
    _, run = train(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=40, x=x, y=y,
                   loss_fn=nn.functional.mse_loss)
    found = {f.kind: f for f in diagnose(run)}
    assert {"exploding_gradient", "non_finite"} <= set(found)
    first_nan = int(run.steps[np.isinf(run.loss)][0])
    assert found["non_finite"].first_step <= first_nan  # gradients overflow before the loss does
    assert found["exploding_gradient"].first_step <= first_nan - 5


def test_nan_in_the_data_is_non_finite_and_stop_on_keeps_the_weights():
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data()
    seen = []
    with pytest.raises(gw.TrainingStopped, match="non_finite"):  # the name docs/diagnose.md gives
        with gw.watch(model, opt, stop_on=("non_finite",), on_finding=seen.append, warn=False):
            for step, batch in batches_with_nan(x, 30, at=(12,)):
                opt.zero_grad()
                nn.functional.cross_entropy(model(batch), y).backward()
                before = [p.detach().clone() for p in model.parameters()]
                opt.step()
    assert step == 12 and [f.kind for f in seen] == ["non_finite"] and seen[0].first_step == 12
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # no NaN reached them
    assert seen[0].causes[0].startswith("bad input data")


def test_negative_bias_kills_relu_units():
    torch.manual_seed(0)
    model = mlp(depth=3)
    nn.init.constant_(model[2].bias, -5.0)
    _, run = train(model, torch.optim.SGD(model.parameters(), lr=0.01))
    dead = next(f for f in diagnose(run) if f.kind == "dead_units")
    assert dead.layers == ("3",) and dead.evidence["dead_fraction"]["3"] > 0.9


def test_large_weights_saturate_tanh():
    torch.manual_seed(0)
    model = mlp(depth=3, act=nn.Tanh)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=3.0)
    _, run = train(model, torch.optim.SGD(model.parameters(), lr=0.01))
    assert "saturation" in kinds(run)


def test_tiny_learning_rate_plateaus():
    torch.manual_seed(0)
    model = mlp(depth=2)
    _, run = train(model, torch.optim.SGD(model.parameters(), lr=1e-6), steps=60)
    assert kinds(run) == {"loss_plateau"}


@pytest.mark.parametrize("bug", ["zero_grad_after_backward", "head_group_at_lr_0"])
def test_gradients_cleared_before_the_step_are_told_apart_from_a_group_at_lr_0(bug):
    """A tester's zero_grad() between backward() and step(): told "the learning rate is 0, or these
    parameters are not in the optimizer", given add_param_group (which raised: they were in it), and
    a plateau's "raise the lr tenfold". A param group at lr 0 keeps that cause."""
    torch.manual_seed(0)
    model, (x, y) = mlp(depth=2), data()
    groups = [{"params": model[:-1].parameters()}, {"params": model[-1].parameters(), "lr": 0.0}]
    opt = torch.optim.SGD(model.parameters() if bug == "zero_grad_after_backward" else groups, lr=0.1, momentum=0.9)
    with gw.watch(model, opt, warn=False) as w:
        for _ in range(60):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if bug == "zero_grad_after_backward":
                opt.zero_grad()
            opt.step()
            if bug != "zero_grad_after_backward":
                opt.zero_grad()
    found = diagnose(w.series())
    f = next(f for f in found if f.kind == "stalled_layers" and f.evidence.get("frozen"))
    if bug == "zero_grad_after_backward":
        assert f.severity == "error" and f.evidence["all_weights"] and not f.evidence["outside_optimizers"]
        assert f.causes[0].startswith("gradients cleared before the step")
        assert f.remedies[0].code == "optimizer.zero_grad()\nloss.backward()\noptimizer.step()"
        assert "loss_plateau" not in {g.kind for g in found}  # (every weight still: the plateau is theirs)
    else:
        assert f.layers == ("4",) and f.evidence["outside_optimizers"] and "lr 0" in f.causes[0]


def test_overshooting_learning_rate_diverges():
    torch.manual_seed(0)
    model = nn.Linear(16, 1)
    x = torch.randn(64, 16)
    y = x @ torch.randn(16, 1)
    _, run = train(model, torch.optim.SGD(model.parameters(), lr=1.5), steps=60, x=x, y=y,
                   loss_fn=nn.functional.mse_loss)
    assert "loss_divergence" in kinds(run)


def test_parameters_left_out_of_the_optimizer_stop_changing():
    torch.manual_seed(0)
    model = mlp(depth=3)
    opt = torch.optim.SGD(model[-1].parameters(), lr=0.1)  # forgot the rest
    _, run = train(model, opt, steps=50)
    f = next(f for f in diagnose(run) if f.kind == "stalled_layers")
    assert f.evidence["frozen"] and set(f.layers) == {"0", "2", "4"}
    # in no optimizer: forgotten, or a backbone frozen on purpose (head-only fine-tuning); the run
    # trains either way, so a warning that says both, with the code for each
    assert f.severity == "warning" and f.evidence["outside_optimizers"] and "no optimizer updates them" in f.message
    exec(f.remedies[0].code, {"model": model, "optimizer": opt})  # the user's optimizer, given the rest
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert f.remedies[1].code == "for m in (model[0], model[2], model[4]):\n    m.requires_grad_(False)"


def test_a_param_group_at_lr_0_freezes_like_no_optimizer():
    torch.manual_seed(0)
    model = mlp(depth=3)
    opt = torch.optim.SGD([{"params": model[-1].parameters()}, {"params": model[:-1].parameters(), "lr": 0.0}],
                          lr=0.1)
    _, run = train(model, opt, steps=50)
    f = next(f for f in diagnose(run) if f.kind == "stalled_layers")
    assert f.severity == "warning" and set(f.layers) == {"0", "2", "4"} and f.evidence["outside_optimizers"]


def test_weights_the_optimizer_holds_that_stop_changing_are_an_error():
    """Held by the optimizer yet unchanged (gradients cleared between backward and step, a classic
    slip): no intention explains it, unlike weights in no optimizer."""
    torch.manual_seed(0)
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gw.watch(model, opt, warn=False)
    x, y = data()
    for _ in range(50):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward(); opt.zero_grad(); opt.step()
    found = w.findings()
    w.detach()
    f = next(f for f in found if f.kind == "stalled_layers")
    assert f.severity == "error" and f.layers == ("0", "2", "4", "6") and not f.evidence["outside_optimizers"]
    assert "stopped changing" in f.message


def test_small_recurrent_weights_vanish_through_time():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(4, 16, batch_first=True)
            self.head = nn.Linear(16, 1)
            with torch.no_grad():
                self.rnn.weight_hh_l0.mul_(0.2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Net()
    x, y = torch.randn(32, 40, 4), torch.randn(32, 1)
    _, run = train(model, torch.optim.SGD(model.parameters(), lr=0.01), steps=40, x=x, y=y,
                   loss_fn=nn.functional.mse_loss)
    f = next(f for f in diagnose(run) if f.layers == ("rnn",))
    assert f.kind == "vanishing_gradient" and f.evidence["per_step_factor"] < 0.5


def test_live_findings_are_said_once_per_kind_and_layer(capsys):
    torch.manual_seed(0)
    model = mlp(depth=8, act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    w, run = train(model, opt, steps=200, x=x, y=y, warn=True, flush_every=10)
    err = capsys.readouterr().err
    assert err.count("vanishing_gradient") == 1 and "gradwatch: [error] vanishing_gradient (step 0)" in err
    assert [f.kind for f in w.findings()] == [f.kind for f in diagnose(run)]


def test_bad_live_options_are_clear_errors():
    model = mlp(depth=1)
    with pytest.raises(ConfigError, match="stop_on.*unknown finding kind"):
        gw.watch(model, stop_on=("nan",))
    with pytest.raises(ConfigError, match="on_finding"):
        gw.watch(model, on_finding=3)
    with pytest.raises(ConfigError, match="run=42: pass a run directory"):
        gw.diagnose(42)


def test_a_step_lost_to_float32_rounding_is_vanishing_not_a_parameter_left_out():
    """Nine sigmoid layers under SGD: the lowest layer's gradient (~1e-8) times the lr is below
    float32's resolution of its weights, so they do not change — starved, not left out."""
    torch.manual_seed(0)
    model = mlp(depth=9, act=nn.Sigmoid)
    _, run = train(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=60)
    g, w = run.series("0", "grad_norm")[1], run.series("0", "weight_norm")[1]
    assert 0.1 * g.max() / w.min() < 1e-8  # the premise: the step is below float32's resolution
    found = diagnose(run)
    assert "vanishing_gradient" in {f.kind for f in found}
    assert not any(f.evidence.get("frozen") for f in found)


def test_the_first_remedy_for_a_deep_sigmoid_net_works_as_pasted():
    """Swapped to Leaky ReLU alone, a deep sigmoid MLP kept torch's default init (a sixth of the
    signal per layer) and still vanished (a tester's 10-layer net: 10% accuracy, as before), and
    a sigmoid giving BCELoss its probabilities was swapped too. The code re-initialises and keeps it."""
    torch.manual_seed(0)
    model = mlp(depth=8, act=nn.Sigmoid)
    _, run = train(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=30)
    code = next(f for f in diagnose(run) if f.kind == "vanishing_gradient").remedies[0].code
    torch.manual_seed(0)
    scope = {"gw": gw, "nn": nn, "torch": torch, "model": nn.Sequential(*mlp(depth=8, act=nn.Sigmoid), nn.Sigmoid()),
             "batch": data()[0]}
    exec(code, scope)
    fixed = scope["model"]
    assert isinstance(fixed[-1], nn.Sigmoid) and not any(isinstance(m, nn.Sigmoid) for m in fixed[:-1])
    x, y = data()
    bce = lambda p, t: nn.functional.binary_cross_entropy(p, nn.functional.one_hot(t, 4).float())
    _, run = train(fixed, torch.optim.SGD(fixed.parameters(), lr=0.1), steps=30, x=x, y=y, loss_fn=bce)
    assert "vanishing_gradient" not in kinds(run)


class ProbabilityThenValue(nn.Module):
    """A deep sigmoid trunk, a sigmoid probability head, then a linear value head (run last)."""

    def __init__(self):
        super().__init__()
        self.trunk = mlp(depth=8, act=nn.Sigmoid)[:-1]
        self.prob, self.value = nn.Sequential(nn.Linear(32, 1), nn.Sigmoid()), nn.Linear(32, 1)

    def forward(self, x):
        h = self.trunk(x)
        return self.prob(h), self.value(h)


def test_the_swap_advice_for_a_net_with_two_heads_keeps_the_probability_heads_sigmoid():
    """The value head runs after the probability head: the printed swap, run as pasted, turned the
    probability head's sigmoid into a Leaky ReLU too, and the script's BCE then raised."""
    x, y = data()
    target = (y[:, None] > 1).float()
    loss = lambda out, y: nn.functional.binary_cross_entropy(out[0], target) + nn.functional.mse_loss(out[1], target)
    torch.manual_seed(0)
    model = ProbabilityThenValue()
    _, run = train(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=30, x=x, y=y, loss_fn=loss)
    code = next(f for f in diagnose(run) if f.kind == "vanishing_gradient").remedies[0].code
    scope = {"gw": gw, "nn": nn, "torch": torch, "model": model, "batch": x}
    exec(code, scope)
    assert isinstance(scope["model"].prob[1], nn.Sigmoid)
    assert not any(isinstance(m, nn.Sigmoid) for m in scope["model"].trunk)
    loss(scope["model"](x), y).backward()  # (BCE raises on a value outside [0, 1])


def test_stop_on_never_stops_on_an_info_finding():
    """Info findings (units saturated while the loss keeps falling) are no problem: a run watched
    with stop_on=("saturation",) must go on; a warning of the same kind stops it."""
    from gradwatch.diagnose.finding import Finding
    from gradwatch.diagnose.live import LiveDiagnosis
    from gradwatch.errors import TrainingStopped
    live = LiveDiagnosis(stop_on=("saturation",), warn=False)
    live.report([Finding("saturation", "info", 20, ("act1",), "confident units")])
    assert [f.severity for f in live.findings] == ["info"]
    with pytest.raises(TrainingStopped):
        live.report([Finding("saturation", "warning", 30, ("act2",), "blocked")])


def _run_with_nan_batches(guarded: bool):
    """A healthy MLP on SGD whose batches 10 and 20 hold a NaN; gw.guard or not."""
    torch.manual_seed(0)
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if guarded:
        gw.guard(opt, patience=5)
    x, y = data()
    with gw.watch(model, opt, warn=False) as w:
        for _, xb in batches_with_nan(x, 40, at=(10, 20)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), y).backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
        return w.series(), model


def test_nan_steps_the_guard_skipped_are_a_warning_without_the_guard_advice():
    """gw.guard kept both NaN steps from the weights and training went on: not "every step after it
    is meaningless", and not "add gw.guard"; the cause (the data) is still to be found."""
    run, model = _run_with_nan_batches(guarded=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    f = next(f for f in diagnose(run) if f.kind == "non_finite")
    assert f.severity == "warning" and f.first_step == 10
    assert f.evidence["guard_skipped_steps"] == [10, 20]
    assert "gw.guard skipped those steps" in f.message and "meaningless" not in f.message
    assert not any("gw.guard" in r.code for r in f.remedies)
    unguarded = next(f for f in diagnose(_run_with_nan_batches(guarded=False)[0]) if f.kind == "non_finite")
    assert unguarded.severity == "error" and any("gw.guard" in r.code for r in unguarded.remedies)


def test_a_finding_of_the_last_steps_is_said_when_the_watch_detaches(capsys):
    """The live rules run at every tenth of the run's growth: a NaN at step 55 of 60 came after the
    last check, and a watch with warn=True never said it."""
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    found = []
    x, y = data()
    with gw.watch(model, opt, warn=True, on_finding=found.append, flush_every=50):
        for _, xb in batches_with_nan(x, 60, at=(55,)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), y).backward()
            opt.step()
    nan = [f for f in found if f.kind == "non_finite"]
    assert len(nan) == 1 and nan[0].first_step == 55
    assert nan[0].line() in capsys.readouterr().err


def test_a_deep_smooth_relu_net_is_told_to_normalise_first():
    """No weight scale keeps SiLU/GELU's signal through depth (~x/2 near 0): a 20-layer SiLU MLP
    still vanished after gw.init_, the first remedy it had been given; with BatchNorm it trained."""
    torch.manual_seed(0)
    model = mlp(depth=20, act=nn.SiLU)
    _, run = train(model, torch.optim.SGD(model.parameters(), lr=0.05), steps=30)
    v = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert v.causes[0].startswith("activation: silu") and v.remedies[0].code == "model, _ = gw.modify.insert_norm(model, 'batch')"
    assert any(r.code == "gw.init_(model)" for r in v.remedies[1:])


def test_a_finding_said_live_that_the_whole_run_does_not_keep_is_said_so(capsys, tmp_path):
    """A tanh regression fitted to ~0 loss had a 31x gradient burst at step 414 said as an error
    while training, and no finding in the whole run (the burst recovered, the loss went on falling).
    What was said live is an event of the store; the whole run's verdict names what it does not keep,
    in process (at detach) and in `gradwatch run`'s summary. Here a healthy run, told live of a
    finding it does not have."""
    import io
    import json

    from gradwatch.cli.summary import print_run_summary
    from gradwatch.diagnose.finding import Finding
    from gradwatch.diagnose.live import LIVE_FINDING, not_kept

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    w = gw.watch(model, opt, flush_every=10, out=tmp_path)
    for _ in range(60):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    said = Finding("exploding_gradient", "error", 30, ("0",), "m")
    w._live.findings.append(said)  # as if said live at step 30
    w.note_event(30, LIVE_FINDING, json.dumps(["exploding_gradient", "0"]))
    w.detach()
    assert gw.diagnose(tmp_path) == []
    assert "exploding_gradient said at step 30 while training is not kept" in capsys.readouterr().err
    out = io.StringIO()
    print_run_summary(tmp_path, out)
    assert "no findings\ngradwatch: exploding_gradient said at step 30 while training is not kept" in out.getvalue()
    assert not_kept([(30, "exploding_gradient", "0")], [said]) == []  # kept: nothing to say
    twice = not_kept([(40, "dead_units", "2"), (30, "dead_units", "0")], [])
    assert len(twice) == 1 and "dead_units said at step 30" in twice[0]  # once a kind, its first step


def test_the_summary_quotes_a_run_directory_with_spaces_in_the_command_it_suggests(tmp_path):
    """`gradwatch run --out "runs/long run"` said 'details: gradwatch diagnose runs/long run':
    pasted, 'unrecognized arguments: run'."""
    import io
    import shlex

    from gradwatch.cli.summary import print_run_summary

    where = tmp_path / "long run"
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, out=where, warn=False):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    out = io.StringIO()
    print_run_summary(where, out)
    line = next(l for l in out.getvalue().splitlines() if "details:" in l)
    assert shlex.split(line.split("details: ")[1]) == ["gradwatch", "diagnose", str(where)]
