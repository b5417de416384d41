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
