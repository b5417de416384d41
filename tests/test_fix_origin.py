"""Remedies for where a NaN/Inf was made (`candidates.from_origin`): an activation written as a class
of the script's is swapped; a batch that held NaN is set to 0 where the model takes it; a loss's
arithmetic gets no trial. Checked against the printed change run by hand."""

import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose.finding import Finding
from gradwatch.fix import at_the_origin, fix
from gradwatch.fix.candidates import GENERIC, adam, aimed, clip_norm, finite_inputs, from_origin, lr_scale, reinit
from gradwatch.fix.inject import FiniteAt, apply_to_model
from gradwatch.fix.locate import NonFiniteLocator, Origin


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


class ScaledExp(nn.Module):  # parameters of its own: no activation to swap
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.exp(self.scale * x)


def _exp_mlp(width: int = 6, depth: int = 6) -> nn.Sequential:
    layers = [m for _ in range(depth) for m in (nn.Linear(width, width), Exp())]
    return nn.Sequential(*layers, nn.Linear(width, 1), nn.Sigmoid())


def test_the_locator_names_an_activation_class_and_not_a_module_with_parameters():
    torch.manual_seed(0)
    model = _exp_mlp()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(20)  # exp of exp overflows in the first forward
    with NonFiniteLocator() as locator:
        model(torch.randn(16, 6)).sum().backward()
    assert locator.origin is not None and locator.origin.made_here and locator.origin.module == "Exp"
    scaled = nn.Sequential(ScaledExp())
    with NonFiniteLocator() as locator:
        scaled(torch.full((1, 2), 200.0)).sum().backward()
    assert locator.origin is not None and locator.origin.op == "aten.exp.default" and locator.origin.module == ""


def test_which_origin_gets_which_remedy():
    held = Origin("aten.slice.Tensor", "/x/t.py", 3, "xb = x[a:b]", False, "NaN")
    in_class = Origin("aten.exp.default", "/x/t.py", 9, "return torch.exp(x)", True, "Inf", module="Exp")
    in_loss = Origin("aten.log.default", "/x/t.py", 22, "return torch.log(var)", True, "NaN")
    gradient = Origin("aten.div.Tensor", "/x/t.py", 3, "d = x.sqrt()", True, "Inf", gradient_of="SqrtBackward0")
    assert [c.spec for c in from_origin(held)] == [{"inputs": ["aten.slice.Tensor", "/x/t.py", 3, "NaN"]}]
    assert [c.spec for c in from_origin(in_class)] == [{"swap": {"from": "Exp", "to": "LeakyReLU", "own": True},
                                                        "init": "auto"}]
    assert "swap_activations(model, Exp, lambda: nn.LeakyReLU(0.01)" in from_origin(in_class)[0].code  # not nn.Exp
    assert from_origin(in_loss) == [] and from_origin(gradient) == []
    assert "t.py:3" in finite_inputs(held).code


def test_training_remedies_follow_the_origins_own_and_at_the_first_step_only_model_changes_stay():
    in_class = Origin("aten.exp.default", "/x/t.py", 9, "return torch.exp(x)", True, "Inf", module="Exp")
    held = Origin("aten.slice.Tensor", "/x/t.py", 3, "xb = x[a:b]", False, "NaN")
    log = Origin("aten.log.default", "/x/t.py", 22, "return torch.log(var)", True, "NaN")
    trained = [lr_scale(0.1), adam(), clip_norm(2.0), reinit()]
    at_init = Finding("non_finite", "error", 0, (), "m", {"at_init": True, "grad_growth_before": float("nan")})
    later = Finding("non_finite", "error", 12, (), "m", {"at_init": False, "grad_growth_before": 1.1})
    assert [c.name for c in at_the_origin(in_class, at_init, trained, GENERIC)] == \
        ["Exp -> LeakyReLU + He init", "re-initialise per activation"]
    # arithmetic the training drove out of its domain may be the lr's: those stay, after
    assert at_the_origin(in_class, later, trained, GENERIC)[1:] == trained
    assert at_the_origin(log, later, trained, GENERIC) == trained
    assert [c.spec for c in at_the_origin(held, later, trained, GENERIC)] == [from_origin(held)[0].spec]  # the data's
    aimed_at = at_the_origin(in_class, later, trained, GENERIC, target="gen")
    assert aimed_at[0].spec["target"] == "gen" and aimed_at[0].name.endswith("(gen)")


def test_the_swap_of_a_class_of_the_scripts_keeps_the_output_and_says_when_it_is_not_in_the_model():
    model = _exp_mlp(depth=3)
    batch = torch.randn(4, 6)
    assert apply_to_model(model, {"swap": {"from": "Exp", "to": "LeakyReLU", "own": True}}, (batch,)) == ""
    assert [type(m).__name__ for m in model] == ["Linear", "LeakyReLU"] * 3 + ["Linear", "Sigmoid"]
    plain = nn.Sequential(nn.Linear(6, 1))
    assert "no Exp module" in apply_to_model(plain, {"swap": {"from": "Exp", "to": "LeakyReLU", "own": True}}, (batch,))


def _distil(mend: bool = False) -> None:
    """A student learns a frozen teacher's outputs and the labels; one row of the data holds NaN."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 16, 6), torch.randn(12, 16, 1)
    x[4, 3, 2] = float("nan")
    teacher, student = nn.Linear(6, 1), nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    for i in range(12):
        xb = torch.nan_to_num(x[i], nan=0.0, posinf=0.0, neginf=0.0) if mend else x[i]  # the batch
        with torch.no_grad():
            soft = teacher(xb)
        opt.zero_grad()
        out = student(xb)
        (nn.functional.mse_loss(out, soft) + nn.functional.mse_loss(out, y[i])).backward()
        opt.step()
    torch.save(student.state_dict(), "weights.pt")


def test_the_data_a_line_takes_is_made_finite_wherever_the_batch_goes_as_the_printed_change(tmp_path, monkeypatch):
    """The batch goes to a teacher too: made finite where the line takes it, the student trains as
    with the printed change (a hook on the student's input alone left the teacher's targets NaN)."""
    monkeypatch.chdir(tmp_path)
    result = fix(_distil, out=tmp_path / "fix", budget_steps=20, progress=lambda m: None)
    line = next(i for i, t in enumerate(open(__file__).read().splitlines(), 1) if t.strip().startswith("xb = torch.nan_to_num"))
    assert result.origin is not None and (result.origin.file, result.origin.line) == (__file__, line)
    assert result.repaired and [t.candidate.spec for t in result.trials] == [from_origin(result.origin)[0].spec]
    _distil(mend=True)
    trained, by_hand = torch.load(result.winner.run_dir / "written" / "weights.pt"), torch.load("weights.pt")
    assert all(torch.equal(trained[k], by_hand[k]) for k in by_hand)


def test_only_that_operation_from_that_line_is_changed_its_nan_alone_for_a_nan():
    x = torch.tensor([[1.0, float("nan")], [-float("inf"), 2.0]])
    line = next(i for i, t in enumerate(open(__file__).read().splitlines(), 1) if t.strip().startswith("picked = "))
    with FiniteAt(__file__, line, "NaN"):
        picked = [x[0], x[1]]  # the line
        other = x[0]
    assert torch.equal(picked[0], torch.tensor([1.0, 0.0])) and torch.equal(picked[1], x[1])  # a -inf mask kept
    assert torch.isnan(other).any() and torch.isnan(x).any()  # another line; the data itself untouched
    line = next(i for i, t in enumerate(open(__file__).read().splitlines(), 1) if t.strip().startswith("both = "))
    with FiniteAt(__file__, line, "Inf"):
        both = x[1]
    assert torch.equal(both, torch.tensor([0.0, 2.0]))


def test_an_in_place_read_is_cleaned_in_place_and_an_op_on_a_weight_gets_its_other_inputs_cleaned():
    """A DataLoader worker's batch arrives set into a storage (in place); a NaN batch entering the
    model's first matmul must not reach the weights' gradient."""
    src, buf = torch.tensor([1.0, float("nan")]), torch.zeros(2)
    line = next(i for i, t in enumerate(open(__file__).read().splitlines(), 1) if t.strip().startswith("buf.copy_("))
    with FiniteAt(__file__, line, "NaN"):
        buf.copy_(src)
    assert torch.equal(buf, torch.tensor([1.0, 0.0]))
    layer = nn.Linear(2, 1)
    line = next(i for i, t in enumerate(open(__file__).read().splitlines(), 1) if t.strip().startswith("out = layer("))
    with FiniteAt(__file__, line, "NaN"):
        out = layer(src[None])
    out.sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and torch.equal(layer.weight.grad, torch.tensor([[1.0, 0.0]]))


class L2Norm(nn.Module):  # parameterless, but no activation: a division's guard, not a swap
    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True)


class Attention(nn.Module):  # parameterless, several inputs
    def forward(self, q, k, v):
        return torch.exp(q @ k.T) @ v


def test_only_an_overflowing_one_input_module_is_named_for_a_swap():
    with NonFiniteLocator() as locator:
        L2Norm()(torch.zeros(2, 3, requires_grad=True)).sum().backward()
    assert locator.origin is not None and locator.origin.op == "aten.div.Tensor" and locator.origin.module == ""
    q = torch.full((2, 3), 30.0, requires_grad=True)
    with NonFiniteLocator() as locator:
        Attention()(q, q, q).sum().backward()
    assert locator.origin is not None and locator.origin.op == "aten.exp.default" and locator.origin.module == ""


def _train(swap_by_hand: bool = False) -> None:
    torch.manual_seed(0)
    x = torch.randn(20, 16, 6) * 3
    y = (x.sum(-1, keepdim=True) > 0).float()
    model = _exp_mlp()
    if swap_by_hand:  # the printed change, pasted before the optimizer is built
        model, _ = gw.modify.swap_activations(model, Exp, lambda: nn.LeakyReLU(0.01), keep_output=True,
                                              example_input=x[0])
        gw.init_(model, "auto", example_input=x[0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(20):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[i]), y[i]).backward()
        opt.step()
    torch.save(model.state_dict(), "weights.pt")


def test_fix_swaps_the_activation_that_overflowed_and_trains_as_the_printed_change(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = fix(_train, out=tmp_path / "fix", budget_steps=30, progress=lambda m: None)
    assert result.baseline.findings[0].kind == "non_finite" and result.origin.module == "Exp"
    assert not result.screened and [t.candidate.name for t in result.trials] == ["Exp -> LeakyReLU + He init"]
    assert result.repaired
    _train(swap_by_hand=True)
    trained, by_hand = torch.load(result.winner.run_dir / "written" / "weights.pt"), torch.load("weights.pt")
    assert list(trained) == list(by_hand) and all(torch.equal(trained[k], by_hand[k]) for k in by_hand)


class SoftmaxByHand(nn.Module):  # exp, then a sum over the row: each output depends on every input
    def forward(self, x):
        e = torch.exp(x)
        return e / e.sum(-1, keepdim=True)


def test_a_softmax_written_by_hand_is_no_activation_to_swap():
    model = nn.Sequential(nn.Linear(3, 4), SoftmaxByHand(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.fill_(100.0)
    with NonFiniteLocator() as locator:
        model(torch.ones(2, 3)).sum().backward()
    assert locator.origin is not None and locator.origin.op == "aten.exp.default" and locator.origin.module == ""


def test_a_nan_the_setup_wrote_and_cleaned_gives_way_to_the_one_the_step_makes():
    """NaN marks missing values, nan_to_num cleans them; the step's log of a negative made the fault."""
    with NonFiniteLocator() as locator:
        raw = torch.randn(8, 3)
        raw[raw < 0] = float("nan")
        data = torch.nan_to_num(raw)
        pred = nn.Parameter(-torch.ones(8))
        loss = torch.log(pred).mean() + data.sum()  # the loss
        loss.backward()
    line = next(i for i, t in enumerate(open(__file__).read().splitlines(), 1) if t.strip().startswith("loss = torch.log"))
    assert locator.origin is not None and locator.origin.made_here and locator.origin.line == line


def _gan() -> None:
    """The discriminator runs first; the generator's own activation overflows at step 0."""
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 8), Exp(), nn.Linear(8, 4))
    disc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        gen[0].weight.mul_(200)
    opt_g, opt_d = torch.optim.Adam(gen.parameters(), lr=1e-3), torch.optim.Adam(disc.parameters(), lr=1e-3)
    real, bce = torch.randn(15, 16, 4) + 2, nn.functional.binary_cross_entropy_with_logits
    for i in range(15):
        z = torch.randn(16, 4)
        opt_d.zero_grad()
        d_real = disc(real[i])
        (bce(d_real, torch.ones_like(d_real)) + bce(disc(gen(z).detach()), torch.zeros_like(d_real))).backward()
        opt_d.step()
        opt_g.zero_grad()
        bce(disc(gen(z)), torch.ones_like(d_real)).backward()
        opt_g.step()
    torch.save(gen.state_dict(), "gen.pt")


def test_the_swap_of_a_class_of_the_scripts_goes_to_the_model_holding_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = fix(_gan, out=tmp_path / "fix", budget_steps=40, progress=lambda m: None)
    assert result.origin is not None and result.origin.module == "Exp"
    trial = next(t for t in [*result.screened, *result.trials] if t.candidate.spec.get("swap", {}).get("own"))
    assert not trial.not_applied and trial.steps > 0
    swapped = torch.load(trial.run_dir / "written" / "gen.pt")
    assert all(torch.isfinite(v).all() for v in swapped.values())



class _Rows(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(480, 6, generator=g)
        self.y = self.x[:, :2].sum(1, keepdim=True)
        self.x[40, 2] = float("nan")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]  # the row


def _loader_run(mend: bool = False) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for xb, yb in torch.utils.data.DataLoader(_Rows(), batch_size=16):  # the loader
        if mend:
            xb = torch.nan_to_num(xb, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        opt.zero_grad()
        nn.functional.mse_loss(model(xb), yb).backward()
        opt.step()
    torch.save(model.state_dict(), "weights.pt")


def test_a_nan_row_batched_by_a_dataloader_is_the_datas_where_the_dataset_takes_it(tmp_path, monkeypatch):
    """The default collate stacks the rows: a NaN row then looked made by torch.stack from finite
    inputs (a list of tensors), and nothing was tried."""
    monkeypatch.chdir(tmp_path)
    result = fix(_loader_run, out=tmp_path / "fix", budget_steps=40, progress=lambda m: None)
    line = next(i for i, t in enumerate(open(__file__).read().splitlines(), 1) if t.strip().endswith("# the row"))
    assert result.origin is not None and not result.origin.made_here and result.origin.line == line
    assert result.repaired
    _loader_run(mend=True)
    trained, by_hand = torch.load(result.winner.run_dir / "written" / "weights.pt"), torch.load("weights.pt")
    assert all(torch.equal(trained[k], by_hand[k]) for k in by_hand)


def test_after_the_data_held_a_nan_an_inf_made_on_purpose_is_a_mask_not_the_origin():
    x = torch.tensor([[1.0, float("nan")], [0.5, 2.0]])
    with NonFiniteLocator() as locator:
        xb = x[0:2]  # the batch
        mask = torch.log(torch.tril(torch.ones(2, 2)))  # -inf above the diagonal, on purpose
        (xb + mask).sum()
    line = next(i for i, t in enumerate(open(__file__).read().splitlines(), 1) if t.strip().startswith("xb = x[0:2]"))
    assert locator.origin is not None and not locator.origin.made_here and locator.origin.line == line


def test_an_unbatched_softmax_by_hand_is_no_activation_either():
    from gradwatch.fix.locate import _elementwise

    assert not _elementwise(SoftmaxByHand(), torch.randn(5)) and _elementwise(Exp(), torch.randn(5))


def test_a_nan_a_model_called_on_the_line_makes_is_left_as_the_printed_change_leaves_it():
    """The line takes the data (which holds a NaN elsewhere) into a model whose grown weights make
    inf - inf: the printed nan_to_num on the batch leaves that NaN, so must the trial."""
    torch.manual_seed(0)
    x = torch.rand(64, 4) + 1.0  # positive: every row overflows both ways
    x[3, 2] = float("nan")
    model = nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight[0].fill_(3e38), model[0].weight[1].fill_(-3e38)
    rows = torch.arange(8, 16)  # rows without the NaN
    line = next(i for i, t in enumerate(open(__file__).read().splitlines(), 1) if t.strip().startswith("out = model(x[rows])"))
    with FiniteAt(__file__, line, "NaN"):
        out = model(x[rows])
    printed = model(torch.nan_to_num(x[rows], nan=0.0, posinf=float("inf"), neginf=float("-inf")))
    assert torch.isnan(printed).all() and torch.isnan(out).all()


def test_a_batch_standardised_on_the_line_reads_the_raw_zero_the_printed_change_writes():
    x, mu, sd = torch.tensor([[1.0, float("nan")]]), torch.tensor([0.5, 50.0]), torch.tensor([1.0, 1.0])
    line = next(i for i, t in enumerate(open(__file__).read().splitlines(), 1) if t.strip().startswith("z = (x - mu) / sd"))
    with FiniteAt(__file__, line, "NaN"):
        z = (x - mu) / sd
    assert torch.equal(z, (torch.nan_to_num(x, nan=0.0) - mu) / sd)  # -50, not the mean's 0
