"""Where a NaN/Inf is made: the locator names the forward operation and the script's line, checked
against what the test itself wrote on that line."""

import sys
import textwrap

import torch
from torch import nn

from gradwatch.diagnose.finding import Finding
from gradwatch.fix import BASELINE, FixResult, Trial
from gradwatch.fix.candidates import Candidate
from gradwatch.fix.locate import NonFiniteLocator, Origin
from gradwatch.fix.trial import run_trial


def _line_of(text: str) -> int:
    lines = open(__file__).read().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line and "_line_of" not in line)


def test_an_operation_that_makes_inf_from_finite_inputs_is_named_with_its_line():
    model = nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.full((8, 1), 0.5)  # a batch of constant targets: variance 0
    with NonFiniteLocator() as locator:
        loss = ((model(x) - y) ** 2).mean() / y.var()  # the division by zero
        loss.backward()
    origin = locator.origin
    assert torch.isinf(loss) and origin is not None
    assert origin.op == "aten.div.Tensor" and origin.made_here and origin.value == "Inf"
    assert (origin.file, origin.line) == (__file__, _line_of("# the division by zero"))
    assert "made the first Inf from finite inputs" in origin.describe()


def test_a_batch_that_already_holds_nan_is_named_where_it_is_taken():
    data = torch.randn(10, 4)
    data[7, 2] = float("nan")
    model = nn.Linear(4, 2)
    with NonFiniteLocator() as locator:
        for i in range(0, 10, 2):
            batch = data[i:i + 2]  # the slice that takes the bad row
            model(batch).sum().backward()
    assert locator.origin is not None and not locator.origin.made_here and locator.origin.value == "NaN"
    assert locator.origin.line == _line_of("# the slice that takes the bad row")


def test_weights_already_non_finite_name_no_origin_and_unwritten_memory_is_no_nan():
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with NonFiniteLocator() as locator:
        torch.empty(1000)  # uninitialised memory may hold anything
        model(torch.randn(3, 4)).sum().backward()
    assert locator.origin is None and locator.done  # it began before the step checked: no line to name


def test_a_gradient_that_is_not_finite_after_a_finite_forward_names_the_forward_line():
    """The distance of two equal points by hand: sqrt(0) is finite, its gradient 1/(2·sqrt(0)) is Inf
    (and a's NaN: 0·Inf)."""
    a = nn.Parameter(torch.ones(3, 2))
    b = torch.ones(3, 2)
    with NonFiniteLocator() as locator:
        assert torch.is_anomaly_enabled()  # the nodes keep their forward traceback, for this step only
        distance = (a - b).pow(2).sum().sqrt()  # equal points
        distance.backward()
    origin = locator.origin
    assert torch.isfinite(distance) and torch.isnan(a.grad).all() and not torch.is_anomaly_enabled()
    assert origin is not None and origin.gradient_of == "SqrtBackward0" and origin.value == "Inf"
    assert origin.line == _line_of("# equal points") and "the gradient of test_fix_locate.py" in origin.describe()


def test_the_optimizers_update_is_not_checked():
    w = nn.Parameter(torch.tensor([1.0]))
    with NonFiniteLocator() as locator:
        with torch.no_grad():
            w.mul_(float("inf"))  # an update: no autograd node, grad disabled
    assert torch.isinf(w).all() and locator.origin is None and not locator.done


def test_a_script_run_again_to_its_bad_step_names_the_line(tmp_path):
    """The subprocess path `gradwatch fix` takes: GRADWATCH_LOCATE_AT set, the origin saved in the run."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(64, 3), torch.randn(64, 1)
        y[40:48] = 1.0  # a stuck sensor: batch 5 has no variance
        for i in range(8):
            yb = y[i * 8:(i + 1) * 8]
            loss = ((model(x[i * 8:(i + 1) * 8]) - yb) ** 2).mean() / yb.var()
            opt.zero_grad(); loss.backward(); opt.step()
    """))
    trial = run_trial([sys.executable, str(script)], tmp_path / "locate", Candidate("baseline"), 6, locate_at=5)
    origin = Origin.load(trial.run_dir)
    assert trial.exit_code == 0 and trial.steps == 6, trial.output_tail(5)
    assert origin is not None and origin.made_here and origin.op == "aten.div.Tensor"
    assert origin.file == str(script) and origin.code.startswith("loss = ")


def _nan_at(step: int, growth: float) -> FixResult:
    evidence = {"first_seen_in": "loss", "at_init": step == 0, "grad_growth_before": growth}
    base = Trial(BASELINE, None, 0, 1.0, steps=20, findings=[Finding("non_finite", "error", step, (), "m", evidence)])
    return FixResult(base, [])


def test_fix_prints_the_line_as_written_and_no_guard_for_a_nan_at_the_first_step():
    from rich.console import Console

    from gradwatch.cli.fix_cmd import print_result

    result = _nan_at(7, 0.8)
    result.origin = Origin("aten.slice.Tensor", "/x/train.py", 34, "out = model(x[start:start + 64])", False, "NaN")
    console = Console(record=True, width=400)
    print_result(result, console)
    text = console.export_text()
    assert "train.py:34: `out = model(x[start:start + 64])`" in text  # not read as rich markup
    assert "step 7 in the loss with no gradient growth" in text and "gw.guard" in text
    at_init = _nan_at(0, float("nan"))
    at_init.origin = Origin("aten.exp.default", "/x/train.py", 9, "return torch.exp(x)", True, "Inf")
    console = Console(record=True, width=400)
    print_result(at_init, console)
    text = console.export_text()
    assert "step 0 in the loss before any update: aten.exp.default made the first Inf" in text
    assert "gw.guard" not in text  # every step would be skipped: no way to train


def test_the_guard_named_is_the_one_for_the_operation():
    made = Origin("aten.div.Tensor", "/x/t.py", 3, "l = a / b", True, "Inf")
    gradient = Origin("aten.div.Tensor", "/x/t.py", 3, "d = x.sqrt()", True, "Inf", gradient_of="SqrtBackward0")
    held = Origin("aten.slice.Tensor", "/x/t.py", 3, "xb = x[a:b]", False, "NaN")
    plain = Origin("aten.mm.default", "/x/t.py", 3, "y = m(x)", True, "Inf")
    assert (made.kind, gradient.kind, held.kind, plain.kind) == ("div", "sqrt", "slice", "mm")
    in_place, reciprocal = (Origin(op, "/x/t.py", 3, "c", True, "Inf") for op in ("aten.div_.Tensor", "aten.reciprocal.default"))
    assert in_place.kind == reciprocal.kind == "div"  # x /= s, 1 / x
    assert "a divisor that can be 0" in made.describe() and "torch.sqrt(x + eps)" in gradient.describe()
    assert "assert torch.isfinite(x).all()" in held.describe() and plain.describe().endswith("`y = m(x)`")


def test_a_winner_over_a_located_nan_is_told_it_may_only_put_it_off():
    from rich.console import Console

    from gradwatch.cli.fix_cmd import print_result

    result = _nan_at(31, 0.97)
    result.origin = Origin("aten.log.default", "/x/t.py", 22, "return torch.log(var)", True, "NaN")
    result.budget_steps = 60
    winner = Trial(Candidate("learning rate x0.1", {"lr_scale": 0.1}), None, 0, 1.0, steps=60, final_loss=0.5)
    result.trials.append(winner)
    assert result.repaired
    console = Console(record=True, width=400)
    print_result(result, console)
    text = console.export_text()
    assert "may only put it off past 60 steps" in text and "t.py:22: `return torch.log(var)`" in text


def test_sparse_and_meta_tensors_pass_through_unchecked():
    """An Embedding(sparse=True)'s gradient and a meta tensor: the check must not break the run."""
    emb = nn.Embedding(10, 4, sparse=True)
    with NonFiniteLocator() as locator:
        emb(torch.tensor([1, 2, 3])).sum().backward()
        torch.empty(3, device="meta").add_(1.0)
    assert emb.weight.grad.is_sparse and locator.origin is None


def test_an_attention_mask_of_minus_inf_is_no_origin_and_the_real_one_is_found():
    """Causal attention fills its scores with -inf on purpose, every forward: the first Inf seen was
    named (the masked_fill line), and the checking stopped there, before the real log(0)."""
    torch.manual_seed(0)
    q = nn.Linear(4, 4)
    x = torch.randn(2, 3, 4)
    with NonFiniteLocator() as locator:
        att = q(x) @ x.transpose(1, 2)
        att = att.masked_fill(torch.ones(3, 3).tril() == 0, float("-inf")).softmax(-1)
        mha = nn.MultiheadAttention(4, 2, batch_first=True)
        out, _ = mha(x, x, x, key_padding_mask=torch.tensor([[False] * 3, [False, True, True]]))
        p = torch.zeros(1) + att.sum() * 0 + out.sum() * 0
        loss = -torch.log(p).mean()  # log(0): the real origin
        loss.backward()
    assert locator.origin is not None and locator.origin.op == "aten.log.default"
    assert locator.origin.line == _line_of("# log(0): the real origin")


def test_a_row_masked_whole_is_a_nan_made_from_a_mask():
    x = torch.randn(2, 3, requires_grad=True)
    with NonFiniteLocator() as locator:
        x.masked_fill(torch.ones(2, 3, dtype=torch.bool), float("-inf")).softmax(-1).sum().backward()  # all masked
    assert locator.origin is not None and locator.origin.value == "NaN" and locator.origin.masked
    assert "from an input masked with ±inf" in locator.origin.describe()


def test_the_budget_counts_the_lead_optimizers_steps_not_every_optimizers():
    """A GAN's two optimizers: each trial ran half its budget, and the locating run stopped halfway."""
    from gradwatch.fix.inject import Injector

    g, d = nn.Linear(2, 2), nn.Linear(2, 1)
    opt_g, opt_d = torch.optim.SGD(g.parameters(), 0.1), torch.optim.SGD(d.parameters(), 0.1)
    injector = Injector({}, max_steps=4)
    injector.install_late()
    iterations = 0
    try:
        for _ in range(10):
            iterations += 1
            d(g(torch.randn(4, 2))).sum().backward()
            opt_d.step()
            opt_g.step()
    except SystemExit:
        pass
    finally:
        injector.remove()
    assert iterations == 4 and injector.steps == 4


def test_the_line_named_is_never_pythons_own_library_nor_a_pass_through():
    import queue

    from gradwatch.fix import locate

    assert not locate._callers((queue.__file__, 1, "x", "get"))  # a DataLoader worker's queue
    assert locate._callers((__file__, 1, "x", "train"))
    assert not locate._callers((locate.__file__, 1, "x", "__torch_function__"))  # the watch's mode
    assert locate._callers((locate.__file__, 1, "x", "activation_stats"))  # the watch's own statistics


def test_a_gradient_made_non_finite_is_found_under_the_watchs_wrapper_of_backward(tmp_path):
    """Watched, `torch.autograd.backward` is gradwatch's wrapper: taken for the watch's own code, it
    hid every gradient's NaN/Inf."""
    import gradwatch as gw

    a, b, m = nn.Parameter(torch.ones(3, 2)), torch.ones(3, 2), nn.Linear(2, 2)
    watch = gw.watch(m, torch.optim.SGD([*m.parameters(), a], 0.1), out=tmp_path, warn=False)
    try:
        with NonFiniteLocator() as locator:
            distance = (a - b).pow(2).sum().sqrt()  # equal points, watched
            distance.backward()
    finally:
        watch.close()
    assert locator.origin is not None and locator.origin.gradient_of == "SqrtBackward0"
    assert locator.origin.line == _line_of("# equal points, watched")


def test_a_nan_the_script_fills_gives_way_to_the_overflow_it_then_makes():
    torch.manual_seed(0)
    raw = torch.randn(16, 4)
    raw[3, 1] = float("nan")  # a missing value
    model = nn.Linear(4, 1)
    with torch.no_grad():
        model.weight.fill_(100.0)
    with NonFiniteLocator() as locator:
        x = (raw - raw.nanmean(0)).nan_to_num(0.0)  # centred, the missing value filled
        out = torch.exp(model(x))  # the overflow
        (out - 1).pow(2).mean().backward()
    assert locator.origin is not None and locator.origin.made_here and locator.origin.op == "aten.exp.default"
    assert locator.origin.line == _line_of("# the overflow")


def test_a_nan_batch_into_a_cross_entropy_stays_the_datas():
    """nll_loss's gradient is finite whatever the log-probabilities: in the backward, a finite output
    from the batch's NaN is no sign the NaN was filled (the digits scenario was named at its backward)."""
    data, labels = torch.randn(10, 4), torch.randint(0, 3, (10,))
    data[7, 2] = float("nan")
    model = nn.Linear(4, 3)
    with NonFiniteLocator() as locator:
        for i in range(0, 10, 2):
            batch = data[i:i + 2]  # the batch taken
            nn.functional.cross_entropy(model(batch), labels[i:i + 2]).backward()
    assert locator.origin is not None and not locator.origin.made_here and not locator.origin.gradient_of
    assert locator.origin.line == _line_of("# the batch taken")


def test_a_finite_part_of_a_nan_batch_is_no_fill_nor_is_a_gradient_penalty_a_forward():
    """A tabular model splitting its features, a logged nanmean, a backward with create_graph: none
    moves the NaN's origin off the line that took the batch."""
    data = torch.randn(16, 6)
    data[3, 4] = float("nan")
    head = nn.Linear(3, 1)
    with NonFiniteLocator() as locator:
        xb = data[0:16]  # the batch, split
        _ = torch.nanmean(xb)
        (head(xb[:, :3]) + head(xb[:, 3:])).sum().backward()
    assert locator.origin is not None and locator.origin.line == _line_of("# the batch, split")
    model = nn.Linear(6, 3)
    with NonFiniteLocator() as locator:
        xb = data[0:16].requires_grad_()  # the batch, penalised
        loss = nn.functional.cross_entropy(model(xb), torch.zeros(16, dtype=torch.long))
        (g,) = torch.autograd.grad(loss, xb, create_graph=True)
        (loss + g.pow(2).sum()).backward()
    assert locator.origin is not None and not locator.origin.made_here
    assert locator.origin.line == _line_of("# the batch, penalised")
