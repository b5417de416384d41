"""A forgotten zero_grad(): the watch sees a gradient carried into the next optimizer step, on real
tiny loops, and nothing in the loops that clear their gradients (each their own way) or carry
them on purpose."""

import pytest
import torch
from torch import nn

import gradwatch as gw

N = 12  # steps per loop: every one checked (sample_every=1) or one in three


def _data(seed: int = 0):
    torch.manual_seed(seed)
    return torch.randn(64, 8), torch.randint(0, 3, (64,))


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _said(model, opt, loop, sample_every: int = 1):
    """Run `loop(step)` N times under a watch; the meta the watch wrote (None: nothing carried)."""
    with gw.watch(model, opt, sample_every=sample_every, warn=False) as watch:
        for step in range(N):
            loop(step)
        return watch.series().meta.get("stale_gradients")


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("sample_every", [1, 3])
def test_a_loop_without_zero_grad_is_found_at_its_second_step(sample_every):
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def loop(step):
        _loss(model, x, y).backward()
        opt.step()

    said = _said(model, opt, loop, sample_every)
    checks = len(range(0, N - 1, sample_every))  # each sampled step is checked at the next one
    assert said == {"optimizer": "SGD", "first_step": 1, "layer": "2", "carried_over": checks, "checks": checks}


@pytest.mark.parametrize("clear", ["set_to_none", "zeros", "model", "by_hand", "data_zero"])
def test_every_way_of_clearing_is_no_carry_over(clear):
    x, y = _data()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loop(step):
        if clear == "set_to_none":
            opt.zero_grad()
        elif clear == "zeros":
            opt.zero_grad(set_to_none=False)
        elif clear == "model":
            model.zero_grad()
        elif clear == "by_hand":
            for p in model.parameters():
                p.grad = None
        elif step:  # old code: the gradient zeroed through .data (no version bump)
            for p in model.parameters():
                p.grad.data.zero_()
        _loss(model, x, y).backward()
        opt.step()

    assert _said(model, opt, loop) is None


def test_zero_grad_after_the_step_is_no_carry_over():
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def loop(step):
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()

    assert _said(model, opt, loop) is None


def test_accumulation_on_purpose_is_no_carry_over():
    """4 micro-batches, then a step, then zero_grad: carried across backwards, never across steps."""
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, sample_every=1, warn=False) as watch:
        for step in range(N):
            for k in range(4):
                (_loss(model, x[16 * k:16 * k + 16], y[16 * k:16 * k + 16]) / 4).backward()
            opt.step()
            opt.zero_grad()
        assert watch.series().meta.get("stale_gradients") is None


def test_a_step_on_every_micro_batch_cleared_every_fourth_is_found():
    """zero_grad every 4 backwards but a step after each: steps 1-3 of 4 reuse earlier gradients."""
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loop(step):
        if step % 4 == 0:
            opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()

    said = _said(model, opt, loop)
    assert said["first_step"] == 1 and said["carried_over"] == 9 and said["checks"] == 11  # 1-3, 5-7, 9-11


def _gan(detach: bool, clear_g: bool, watch_d: bool = False):
    torch.manual_seed(0)
    g, d = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6)), nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    opt_g, opt_d = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    real = torch.randn(32, 6)
    bce = nn.functional.binary_cross_entropy_with_logits

    def loop(step):
        z = torch.randn(32, 4)
        fake = g(z)
        opt_d.zero_grad()
        d_loss = bce(d(real), torch.ones(32, 1)) + bce(d(fake.detach() if detach else fake), torch.zeros(32, 1))
        d_loss.backward()  # not detached: writes into G's gradients too, cleared below
        opt_d.step()
        if clear_g:
            opt_g.zero_grad()
        bce(d(g(z)), torch.ones(32, 1)).backward()  # writes into D's gradients, cleared next step
        opt_g.step()

    return _said(d, opt_d, loop) if watch_d else _said(g, opt_g, loop)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("watch_d", [True, False])
def test_a_gan_whose_backwards_cross_models_is_no_carry_over(detach, watch_d):
    assert _gan(detach, clear_g=True, watch_d=watch_d) is None


def test_a_gan_that_forgets_the_generators_zero_grad_is_found():
    said = _gan(detach=False, clear_g=False)
    assert said["optimizer"] == "Adam" and said["first_step"] == 1 and said["carried_over"] == said["checks"] == N - 1
    assert _gan(detach=False, clear_g=False, watch_d=True) is None  # the discriminator's own are cleared


@pytest.mark.parametrize("clear", [True, False])
def test_lbfgs_closure(clear):
    x, y = _data()
    model = _mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)

    def closure():
        if clear:
            opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    said = _said(model, opt, lambda step: opt.step(closure))
    if clear:
        assert said is None
    else:
        assert said["optimizer"] == "LBFGS" and said["first_step"] == 1


def test_a_parameter_without_gradient_at_some_steps_and_frozen_ones():
    """The second head runs on odd steps only (its gradient: None on even ones); the first layer is
    frozen. With zero_grad: nothing; without: found."""
    for clear in (True, False):
        x, y = _data()
        torch.manual_seed(1)
        body, heads = nn.Sequential(nn.Linear(8, 16), nn.Tanh()), nn.ModuleList([nn.Linear(16, 3), nn.Linear(16, 3)])
        body[0].requires_grad_(False)
        model = nn.ModuleDict({"body": body, "heads": heads})
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

        def loop(step):
            if clear:
                opt.zero_grad()
            nn.functional.cross_entropy(heads[step % 2](body(x)), y).backward()
            opt.step()

        said = _said(model, opt, loop)
        # (head 0's step-0 gradient is next reached, and seen carried, at step 2)
        assert (said is None) if clear else (said["first_step"] == 2 and said["carried_over"] == said["checks"] > 0)


def test_a_step_without_backward_is_no_carry_over():
    """A second step with no backward since (the gradient simply not moved) tells nothing."""
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def loop(step):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        if step % 3 == 0:
            opt.step()  # (again, on the same gradients)

    assert _said(model, opt, loop) is None


@pytest.mark.parametrize("clear", [True, False])
def test_grad_scaler(clear):
    """A loss scaler unscales the gradients in place between backward and step: the check does not
    compare across that, so both readings hold."""
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)

    def loop(step):
        if clear:
            opt.zero_grad()
        scaler.scale(_loss(model, x, y)).backward()
        scaler.step(opt)
        scaler.update()

    said = _said(model, opt, loop)
    assert (said is None) if clear else (said["first_step"] == 1 and said["carried_over"] == said["checks"] == N - 1)


def test_watching_the_check_changes_nothing():
    """The buggy loop, watched with every step checked, gives the same losses and weights bit for bit."""
    def run(watched: bool):
        x, y = _data()
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        watch = gw.watch(model, opt, sample_every=1, warn=False) if watched else None
        losses = []
        for step in range(N):
            loss = _loss(model, x, y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        if watch is not None:
            assert watch.series().meta["stale_gradients"]["carried_over"] == N - 1
            watch.detach()
        return losses, [p.detach().clone() for p in model.parameters()], [p.grad.clone() for p in model.parameters()]

    a, b = run(False), run(True)
    for ours, theirs in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(ours, theirs))


def test_the_check_is_the_sum_of_gradients():
    """What the check claims, against torch: without zero_grad, step t's gradient is the float sum of
    the per-step gradients (each computed at that step's weights), added in step order."""
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    total = None
    for step in range(4):
        fresh = torch.autograd.grad(_loss(model, x, y), model[2].bias)[0]
        _loss(model, x, y).backward()
        total = fresh if total is None else total + fresh
        assert torch.equal(model[2].bias.grad, total)
        opt.step()



def test_zero_code_mode_then_gradwatch_diagnose_says_it(tmp_path):
    """`gradwatch run`'s watch (in this process: the subprocess only adds ~3 s of imports): the
    optimizer is adopted at its first step and checked as under gw.watch; the CLI says it plainly."""
    import contextlib
    import io

    from gradwatch.cli.main import main
    from gradwatch.collect.auto import AutoWatch

    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = AutoWatch(str(tmp_path), warn=False)
    try:
        for step in range(30):
            _loss(model, x, y).backward()  # no optimizer.zero_grad()
            opt.step()
    finally:
        watch.detach()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["diagnose", str(tmp_path)])
    text = out.getvalue()
    assert "ERROR stale_gradients since step 1" in text
    assert "not cleared between SGD steps: at each of the 3 steps checked from step 1 on" in text
    assert "optimizer.zero_grad()" in text


@pytest.mark.parametrize("clear", [True, False])
def test_clipping_between_backward_and_step(clear):
    """Clipped in place after backward (and before the step): the gradient is compared only when a
    backward starts, so a carry-over is still found, and a clear still none."""
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def loop(step):
        if clear:
            opt.zero_grad()
        _loss(model, x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()

    said = _said(model, opt, loop)
    assert (said is None) if clear else (said["first_step"] == 1 and said["carried_over"] == said["checks"] == N - 1)


def test_an_all_zero_gradient_gives_no_verdict():
    """The smallest parameter's gradient is exactly 0 at every step (a bias under a ReLU dead for the
    batch): zeros cannot be told from a clear, so no check counts; the watch says nothing."""
    x, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3), nn.ReLU())
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # every output unit off: its bias gets 0
    opt = torch.optim.SGD([model[2].bias], lr=0.05)

    def loop(step):
        nn.functional.cross_entropy(model(x), y).backward()  # no zero_grad, but nothing to carry
        opt.step()

    with gw.watch(model, opt, sample_every=1, warn=False) as watch:
        for step in range(N):
            loop(step)
        assert watch.series().meta.get("stale_gradients") is None
        assert watch._stale.checks == 0


@pytest.mark.parametrize("loop", ["forgot", "cleared", "accumulated"])
def test_updates_by_hand(loop):
    """No optimizer: each backward is a step. A carry-over is a gradient untouched across an update
    of the weights; two backwards before each update (accumulation on purpose, cleared after) are none."""
    x, y = _data()
    model = _mlp()
    with gw.watch(model, sample_every=1, warn=False) as watch:
        for step in range(N):
            _loss(model, x, y).backward()
            if loop == "accumulated" and step % 2 == 0:
                continue
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
            if loop != "forgot":
                model.zero_grad()
        said = watch.series().meta.get("stale_gradients")
    if loop == "forgot":
        # a check spans one update: from the first backward after it to the first after the next
        assert said == {"optimizer": "", "first_step": 1, "layer": "2", "carried_over": (N - 2) // 2,
                        "checks": (N - 2) // 2}
        f = next(f for f in gw.diagnose(watch.series()) if f.kind == "stale_gradients")
        assert "weight updates (by hand)" in f.message and "model.zero_grad()" in f.remedies[0].code
    else:
        assert said is None


def _ops_per_step(check: bool) -> list[dict]:
    """Kernels of each of steps 0-4 (sample_every=4: copies after steps 0 and 4, a verdict at 1),
    with the check, or with it made inert."""
    from test_watch_overhead import CountOps

    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    counts = []
    with gw.watch(model, opt, sample_every=4, warn=False) as watch:
        if not check:
            watch._stale.arm = lambda *a, **k: None
        for step in range(5):
            with CountOps() as counted:
                opt.zero_grad()
                _loss(model, x, y).backward()
                opt.step()
            counts.append(counted.ops)
    return counts


def test_the_check_costs_no_kernel_between_samples():
    """Steps 2 and 3 run exactly the kernels they ran without the check; the copy after the sampled
    steps 0 and 4 four (detach, clone, ne, any); the verdict at step 1 none (zero_grad() left None:
    no comparison)."""
    plain, checked = _ops_per_step(False), _ops_per_step(True)
    assert checked[2] == plain[2] and checked[3] == plain[3]
    extra = [sum(checked[s].values()) - sum(plain[s].values()) for s in range(5)]
    assert extra == [4, 0, 0, 0, 4]


def test_a_new_optimizer_for_the_head_only_is_checked_on_its_own_weights():
    """Phase 2: a new optimizer for the head alone; the body still gets gradients that nobody clears
    or steps (its zero_grad() clears the head's only). Its steps use fresh gradients: no carry-over.
    (The body's bias is the smallest parameter, checked in phase 1: it must not be in phase 2.)"""
    x, y = _data()
    model = nn.Sequential(nn.Linear(8, 2), nn.Tanh(), nn.Linear(2, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gw.watch(model, opt, sample_every=1, warn=False) as watch:
        for step in range(2 * N):
            if step == N:
                del opt
                opt = torch.optim.SGD(model[2].parameters(), lr=0.05)
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        assert watch.series().meta.get("stale_gradients") is None
        assert watch._stale.checks >= N  # (checked in both phases)


def test_stop_on_stale_gradients_stops_at_the_next_flush():
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = gw.watch(model, opt, sample_every=1, flush_every=5, warn=False, stop_on=("stale_gradients",))
    steps = 0
    with pytest.raises(gw.TrainingStopped):
        for steps in range(50):
            _loss(model, x, y).backward()
            opt.step()
    watch.detach()
    assert steps < 10


def test_the_exploding_gradient_it_causes_names_it_first():
    """A real run: regression under SGD without zero_grad; the weights grow ~10x in 96 steps (an
    exploding_gradient), whose first cause and first remedy are now the stale gradients'."""
    torch.manual_seed(0)
    x = torch.randn(1024, 20)
    y = x @ torch.randn(20, 1) + 0.1 * torch.randn(1024, 1)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(model, opt, warn=False) as watch:
        for epoch in range(3):
            for i in range(0, 1024, 32):
                nn.functional.mse_loss(model(x[i:i + 32]), y[i:i + 32]).backward()
                opt.step()
        found = {f.kind: f for f in watch.findings()}
    assert found["stale_gradients"].first_step == 1
    explode = found["exploding_gradient"]
    assert explode.causes[0].startswith("stale gradients:") and "zero_grad()" in explode.remedies[0].code
    assert "zero_grad()" in explode.message


@pytest.mark.parametrize("cleared", [True, False])
@pytest.mark.parametrize("sample_every", [1, 3])
def test_updates_by_hand_with_an_attack_backward_before_the_clear(cleared, sample_every):
    """FGSM training by hand: the attack's backward runs before the loop clears, and sees the last
    step's gradient; the training backward after the clear does not. Each update was read as a
    carry-over (an ERROR on a correct loop); a forgotten clear is still found."""
    x, y = _data()
    model = _mlp()
    with gw.watch(model, sample_every=sample_every, warn=False) as watch:
        for step in range(N):
            xa = x.clone().requires_grad_(True)
            _loss(model, xa, y).backward()  # the attack's: into the weights' gradients too
            x_adv = (x + 0.1 * xa.grad.sign()).detach()
            if cleared:
                model.zero_grad()
            _loss(model, x_adv, y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
        said = watch.series().meta.get("stale_gradients")
    if cleared:
        assert said is None
    else:
        assert said["optimizer"] == "" and said["carried_over"] == said["checks"] >= 2


@pytest.mark.parametrize("loop", ["by_hand_forgot", "by_hand_accumulated", "optimizer_accumulated"])
def test_zero_code_mode_first_steps(tmp_path, loop):
    """Before zero-code mode knows how the weights are updated (its first backwards), the check runs
    as for updates by hand; an optimizer's first step drops that copy and checks as its own."""
    from gradwatch.collect.auto import AutoWatch

    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = AutoWatch(str(tmp_path), warn=False)
    try:
        for step in range(N):
            _loss(model, x, y).backward()
            if loop != "by_hand_forgot" and step % 2 == 0:
                continue  # two backwards per update
            if loop == "optimizer_accumulated":
                opt.step()
                opt.zero_grad()
                continue
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
            if loop == "by_hand_accumulated":
                model.zero_grad()
        said = watch.series().meta.get("stale_gradients")
    finally:
        watch.detach()
    if loop == "by_hand_forgot":
        assert said["optimizer"] == "" and said["first_step"] == 1 and said["carried_over"] == said["checks"]
    else:
        assert said is None


@pytest.mark.parametrize("clear", [True, False])
def test_a_parameter_whose_gradient_is_exactly_zero_is_replaced(clear):
    """A WGAN critic's loss, D(fake).mean() - D(real).mean(): its output bias gets exactly 0, so its
    copy says nothing; from the next flush on another parameter is checked."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.Adam(critic.parameters(), 1e-3)
    with gw.watch(critic, opt, sample_every=1, flush_every=3, warn=False) as watch:
        for step in range(N):
            if clear:
                opt.zero_grad()
            (critic(torch.randn(32, 2)).mean() - critic(torch.randn(32, 2) + 3).mean()).backward()
            opt.step()
        said = watch.series().meta.get("stale_gradients")
        assert watch._stale.checks >= N - 5
    assert (said is None) if clear else (said["first_step"] <= 5 and said["carried_over"] == said["checks"])


def test_by_hand_a_parameter_the_loop_never_updates_is_given_up_for_another():
    """Only the head updated by hand, nothing ever cleared: the smallest parameter (the backbone's
    PReLU) was checked and waited for an update that never came, with a host sync every backward,
    and the forgotten clear was never found."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.PReLU(), nn.Linear(32, 1))
    x, y = torch.randn(64, 10), torch.randn(64, 1)
    with gw.watch(model, warn=False) as watch:
        for _ in range(100):
            nn.functional.mse_loss(model(x), y).backward()
            with torch.no_grad():
                for p in model[2].parameters():
                    p -= 1e-3 * p.grad
        said = watch.series().meta.get("stale_gradients")
    assert said is not None and said["optimizer"] == "" and said["layer"] == "2"
    assert said["carried_over"] == said["checks"] >= 2


def test_checks_are_counted_from_the_first_carry_over_on():
    """A correct loop, then the same loop without its zero_grad(): the message said "at 29 of the 59
    steps checked from step 311 on", counting the correct loop's checks before that step."""
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gw.watch(model, opt, sample_every=1, warn=False) as watch:
        for step in range(2 * N):
            if step < N:
                opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        said = watch.series().meta.get("stale_gradients")
    # step N is the first whose gradient holds the last step's; every check from there on found it
    assert said["first_step"] == N and said["carried_over"] == said["checks"] and N - 2 <= said["checks"] <= N
    assert watch._stale.checks > N + 5  # (the first loop's were checked too, and are not counted)
