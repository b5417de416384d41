"""The signatures the docs print are the code's: every call in docs/remedies.md's table and the
`gw.watch(...)` line of the README, compared with `inspect.signature` (names, kinds, defaults)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
from torch import nn

import gradwatch as gw
from gradwatch.diagnose.thresholds import Thresholds

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"positional": inspect.Parameter.POSITIONAL_OR_KEYWORD, "kwonly": inspect.Parameter.KEYWORD_ONLY}


def documented(call: str) -> list[tuple[str, str, object]]:
    """(name, kind, default or inspect.Parameter.empty) of each argument of `f(a, b=1, *, c=2)`."""
    args = ast.parse(f"def f({call[call.index('(') + 1:call.rindex(')')]}): pass").body[0].args
    positional = args.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults)) + list(args.defaults)
    out = [(a.arg, "positional", d) for a, d in zip(positional, defaults)]
    out += [(a.arg, "kwonly", inspect.Parameter.empty if d is None else d)
            for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return [(n, k, d if d is inspect.Parameter.empty else eval(ast.unparse(d), {"nn": nn})) for n, k, d in out]


def same_default(doc: object, real: object) -> bool:
    if callable(doc) and not isinstance(doc, type):  # a factory: compare what it builds
        return repr(doc()) == repr(real())
    return doc == real


def check(call: str, fn) -> None:
    real = inspect.signature(fn).parameters
    doc = documented(call)
    assert [n for n, _, _ in doc] == list(real), call
    for name, kind, default in doc:
        assert real[name].kind == KINDS[kind], f"{call}: {name} is {real[name].kind.description}"
        assert same_default(default, real[name].default), f"{call}: {name}={real[name].default!r} in the code"


def remedies_calls() -> list[str]:
    table = [l for l in (ROOT / "docs/remedies.md").read_text().splitlines() if l.startswith("| ") and "`gw." in l]
    return [c for row in table for c in re.findall(r"`(gw\.[\w.]+\(.*?\))`", row.split(" | ")[1])]


@pytest.mark.parametrize("call", remedies_calls())
def test_remedies_table_matches_signatures(call):
    path = call[:call.index("(")].split(".")[1:]
    fn = gw
    for part in path:
        fn = getattr(fn, part)
    check(call, fn)


def test_remedies_table_lists_every_remedy():
    assert len(remedies_calls()) == 13


def test_readme_watch_signature():
    text = " ".join((ROOT / "README.md").read_text().split())
    call = re.search(r"`(gw\.watch\(model, optimizer=None, \*.*?\))`", text).group(1)
    check(call, gw.watch)


def test_thresholds_named_in_diagnose_doc_exist():
    assert gw.Thresholds is Thresholds
    text = (ROOT / "docs/diagnose.md").read_text()
    named = set(re.findall(r"`([a-z_]+_(?:ratio|factor|window))`", text))
    assert named and named <= set(Thresholds.__dataclass_fields__), named - set(Thresholds.__dataclass_fields__)


# -- the Python snippets of the README and the docs pages, pasted as they are -------------------------

def snippets(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)


def context() -> dict:
    """What a snippet leaves to the reader: a small sigmoid MLP, its optimizer, loss and data."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 3))
    xs, ys = torch.randn(64, 8), torch.randint(0, 3, (64,))
    loader = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 64, 16)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()

    def train():  # one batch is poisoned: its step is skipped
        for i, (x, y) in enumerate(loader):
            optimizer.zero_grad()
            (loss_fn(model(x), y) * (float("nan") if i == 1 else 1.0)).backward()
            optimizer.step()

    return dict(torch=torch, nn=nn, F=F, gw=gw, model=model, optimizer=optimizer, loss_fn=loss_fn, loader=loader,
                x=xs[:16], y=ys[:16], batch_x=xs[:4], train=train)


PAGES = {"README.md": 1, "docs/probe.md": 1, "docs/remedies.md": 4, "docs/lab.md": 1}


@pytest.mark.parametrize("page,index", [(p, i) for p, n in PAGES.items() for i in range(n)])
def test_python_snippets_run_as_written(page, index, tmp_path, monkeypatch, capsys):
    import warnings

    assert len(snippets(page)) == PAGES[page]  # a new snippet: add it here
    code = snippets(page)[index]
    monkeypatch.chdir(tmp_path)  # what a snippet writes (flow.png, lab-out/) goes here
    ns = context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the watch's live findings, the guard's skip
        exec(compile(code, f"{page}#{index}", "exec"), ns)
    out = capsys.readouterr().out
    printed = [line[2:] for line in code.splitlines() if line.startswith("# ")]
    if printed:  # the output shown under the call, as comments
        assert out.strip().splitlines() == printed
    if "print(result)" in code:
        assert "verdict" in out and "gain→top" in out
    if "g.report()" in code:
        assert out.startswith("guard: 1 of 4 steps skipped (non-finite gradients)"), out
    if "lab.run_one" in code:
        assert out.startswith("True [") and (tmp_path / "lab-out/activations/index.html").is_file()
