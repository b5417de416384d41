"""A backbone frozen mid-run (requires_grad_(False)) for a fine-tune on new data: the total norm
then sums other layers over another loss, and its leap at that step is the new phase's level, not
an explosion. The same leap with every layer still trained, or one later in the phase, still is."""

import numpy as np

import gradwatch as gw
from series_builder import build, kinds


def _fine_tune(freeze: bool, leap_at: int = 150):
    run = build(n_steps=400, depth=3, optimizer="Adam", lr=1e-3)
    t = np.arange(400)
    g = np.where(t < leap_at, 0.3, 0.3 + 12 * np.exp(-(t - leap_at) / 60))
    g = g * np.exp(0.1 * np.random.default_rng(0).standard_normal(400))
    for i in range(3):
        run.metrics["grad_norm"][:, run.column(f"fc{i}")] = g / np.sqrt(3)
    if freeze:
        for i in range(2):
            run.metrics["grad_norm"][150:, run.column(f"fc{i}")] = np.nan
    return run


def test_a_leap_where_the_trained_layers_change_is_no_explosion():
    assert "exploding_gradient" not in kinds(gw.diagnose(_fine_tune(freeze=True)))


def test_a_live_check_right_after_the_switch_sees_no_explosion_either():
    run = _fine_tune(freeze=True).between(0, 160)  # what a check 10 steps after the switch reads
    assert "exploding_gradient" not in kinds(gw.diagnose(run))


def test_the_same_leap_without_a_change_or_later_in_the_phase_still_explodes():
    assert "exploding_gradient" in kinds(gw.diagnose(_fine_tune(freeze=False)))
    assert "exploding_gradient" in kinds(gw.diagnose(_fine_tune(freeze=True, leap_at=250)))


def test_a_leap_where_the_trained_layers_change_that_ends_non_finite_still_explodes():
    run = _fine_tune(freeze=True)
    run.metrics["grad_norm"][200:, run.column("fc2")] = np.inf
    run.loss[200:] = np.inf
    assert "exploding_gradient" in kinds(gw.diagnose(run))


def test_gradual_unfreezing_that_blows_up_the_layers_already_trained_still_explodes():
    # fc2 alone, fc1 joins at 150, fc0 at 300: at each, every trained layer leaps 1000x and stays 100x up
    run = build(n_steps=450, depth=3, optimizer="Adam", lr=1e-3)
    t = np.arange(450)
    level = np.ones(450)
    for s in (150, 300):
        level[s:] *= 100
        level[s:s + 5] *= 10
    noise = np.exp(0.1 * np.random.default_rng(0).standard_normal(450))
    for i, on in ((0, 300), (1, 150), (2, 0)):
        run.metrics["grad_norm"][:, run.column(f"fc{i}")] = np.where(t >= on, level * noise, np.nan)
    assert "exploding_gradient" in kinds(gw.diagnose(run))


def _head_swap(head_lr: float, tmp_path):
    """Pretrain with Adam, then a new head where the old one was, the backbone frozen, and SGD for
    the fine-tune whose groups were swapped by a typo (`head_lr` 0: the head never learns); watched
    as `gradwatch run` watches, with no code."""
    import torch
    from torch import nn

    from gradwatch.collect.auto import AutoWatch

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    model = nn.Sequential(backbone, nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    (run_dir := tmp_path / f"lr{head_lr}").mkdir()
    watch = AutoWatch(str(run_dir), warn=False, status=False)
    for step in range(300):
        if step == 100:
            model[1] = nn.Linear(16, 3)
            backbone.requires_grad_(False)
            opt = torch.optim.SGD([{"params": backbone.parameters(), "lr": 0.05 - head_lr},
                                   {"params": model[1].parameters(), "lr": head_lr}], momentum=0.9)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    watch.detach()
    return gw.diagnose(watch.stored_series())


def test_a_new_head_left_at_lr_0_by_the_fine_tunes_optimizer_is_stalled(tmp_path):
    """A tester's fine-tune: the head replaced after pretraining and put in a group at lr 0. The
    pretraining's Adam stopped, and every layer only it held was taken as frozen on purpose, the
    new head, at the old one's name, too: no finding, while the loss sat at chance for 300 steps."""
    stalled = [f for f in _head_swap(0.0, tmp_path) if f.kind == "stalled_layers"]
    assert len(stalled) == 1 and stalled[0].layers == ("1",) and stalled[0].first_step >= 100
    assert not [f for f in _head_swap(0.05, tmp_path) if f.kind == "stalled_layers"]


def _head_swapped(new_loss: np.ndarray):
    """A backbone (fc0, fc1) pretrained to convergence under head fc3, then fine-tuned from step 200
    under a new head fc2: its gradient leaps 70x and stays 10x above the converged level."""
    run = build(n_steps=400, depth=4, optimizer="Adam", lr=1e-3)
    t = np.arange(400)
    noise = np.exp(0.1 * np.random.default_rng(0).standard_normal(400))
    backbone = np.where(t < 200, 0.01, 0.1 + 0.6 * np.exp(-(t - 200) / 50)) * noise
    for i in range(4):
        run.metrics["grad_norm"][:, run.column(f"fc{i}")] = backbone
    run.metrics["grad_norm"][200:, run.column("fc3")] = np.nan
    run.metrics["grad_norm"][:200, run.column("fc2")] = np.nan
    run.loss[:200] = 0.001 + 2 * np.exp(-t[:200] / 20)
    run.loss[200:] = new_loss
    return run


def test_a_converged_backbone_fine_tuned_under_a_new_head_whose_loss_falls_is_no_explosion():
    falling = 0.03 + 0.66 * np.exp(-np.arange(200) / 40)
    assert "exploding_gradient" not in kinds(gw.diagnose(_head_swapped(falling)))
    assert "exploding_gradient" in kinds(gw.diagnose(_head_swapped(np.full(200, 0.69))))


def test_a_new_head_at_the_old_ones_name_under_a_new_optimizer_starts_a_phase_too():
    # the same layers trained before and after; only the optimizer's switch (meta optimizer_stopped) marks it
    run = _head_swapped(0.03 + 0.66 * np.exp(-np.arange(200) / 40))
    g = run.metrics["grad_norm"]
    g[200:, run.column("fc3")] = g[200:, run.column("fc0")]
    run = run.of_layers([run.column(f"fc{i}") for i in (0, 1, 3)])
    assert "exploding_gradient" in kinds(gw.diagnose(run))
    run.meta["optimizer_stopped"] = [[200, []]]
    assert "exploding_gradient" not in kinds(gw.diagnose(run))


def test_a_lora_models_frozen_base_pretrained_in_the_first_phase_is_no_graph_cut(tmp_path):
    """A tester's LoRA fine-tune: a base MLP pretrained, frozen, and wrapped with rank-2 adapters
    trained by a new optimizer. The base's layers ran in the new model with no gradient, and were
    told the graph was cut, with `requires_grad_(False)` (what the script did) as the fix."""
    import torch
    from torch import nn

    from gradwatch.collect.auto import AutoWatch

    class LoRA(nn.Module):
        def __init__(self, lin: nn.Linear):
            super().__init__()
            self.lin = lin.requires_grad_(False)
            self.a = nn.Parameter(torch.randn(4, lin.in_features) / lin.in_features ** 0.5)
            self.b = nn.Parameter(torch.zeros(lin.out_features, 4))

        def forward(self, x):
            return self.lin(x) + 2 * (x @ self.a.T) @ self.b.T

    watch = AutoWatch(str(tmp_path), warn=False, status=False)  # as `gradwatch run` starts it: before the model
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 5))
    teacher = torch.randn(64, 5)  # a task to learn in each phase
    pre = torch.optim.Adam(base.parameters(), lr=1e-3)  # (kept: as a script's own name keeps it)
    for step in range(100):
        x = torch.rand(64, 64)
        loss = nn.functional.cross_entropy(base(x), (x @ teacher).argmax(1))
        pre.zero_grad(), loss.backward(), pre.step()
    model = nn.Sequential(LoRA(base[0]), nn.ReLU(), LoRA(base[2]), nn.ReLU(), nn.Linear(128, 5))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(150):
        x = torch.rand(64, 64)
        loss = nn.functional.cross_entropy(model(x), (x @ teacher).argmax(1))
        opt.zero_grad(), loss.backward(), opt.step()
    watch.detach()
    found = gw.diagnose(watch.stored_series())
    assert not [f for f in found if f.kind == "stalled_layers"], [f.message for f in found]
