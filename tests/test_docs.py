"""The README and docs/ say what the code does: the signatures they print are the code's
(`inspect.signature`), their Python snippets run as pasted, every API name, CLI option and command
line they show exists and parses, every option exists on some page, and tables and numbers taken
from benchmarks/RESULTS.md are the same there."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import shlex
from pathlib import Path

import pytest
from torch import nn

import gradwatch as gw
from gradwatch.cli.main import COMMANDS
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
    assert len(remedies_calls()) == 14


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


# -- what every page names must exist: the API, the CLI's options, the benchmark's numbers ------------

DOC_PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]


def page_text(page: str) -> str:
    return (ROOT / page).read_text()


def resolve(dotted: str) -> object:
    """`gw.clip.ZClip` or `gradwatch.probe.core.sumsq_loss`: the longest module found, then attributes.
    A name that is a module is found without running it (gradwatch.integrations.lightning imports
    Lightning, 3 s)."""
    parts = ["gradwatch", *dotted.split(".")[1:]] if dotted.startswith("gw.") else dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            spec = importlib.util.find_spec(".".join(parts[:cut]))
        except ImportError:  # a parent that is no package
            spec = None
        if spec is None:
            continue
        if cut == len(parts):
            return spec
        obj = importlib.import_module(".".join(parts[:cut]))
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("page", DOC_PAGES)
def test_api_named_in_the_page_exists(page):
    """Every `gw.x.y` and `gradwatch.x.y` the prose and code name, and every `from gradwatch... import`
    of its snippets: a renamed or removed function leaves no stale name behind."""
    text = page_text(page)
    named = set(re.findall(r"(?<![\w.-])(?:gw|gradwatch)(?:\.\w+)+", text))
    named = {n for n in named if not n.endswith((".sqlite", ".lock"))}  # file names, not modules
    missing = []
    for name in sorted(named):
        try:
            resolve(name)
        except (AttributeError, ImportError):
            missing.append(name)
    for module, names in re.findall(r"from (gradwatch[\w.]*) import (\w+(?:, \w+)*)", text):
        missing += [f"{module}.{n}" for n in names.split(", ") if not defines(module, n)]
    for code in snippets(page):
        ast.parse(code)  # a snippet that does not parse fails here
    assert not missing, f"{page} names what does not exist: {missing}"


def defines(module: str, name: str) -> bool:
    """`from module import name` would work: a submodule, or a name bound at the module's top level,
    read from its source (importing gradwatch.integrations.lightning would import Lightning)."""
    spec = importlib.util.find_spec(module)
    if spec.submodule_search_locations and importlib.util.find_spec(f"{module}.{name}") is not None:
        return True
    tree = ast.parse(Path(spec.origin).read_text())
    bound = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound |= {n.id for tg in targets for n in ast.walk(tg) if isinstance(n, ast.Name)}
    return name in bound


def test_every_public_name_is_documented():
    text = "\n".join(page_text(p) for p in DOC_PAGES)
    undocumented = [n for n in gw.__all__ if not re.search(rf"(?:gw\.|gradwatch\.|`){n}\b", text)]
    assert not undocumented, f"gw.{undocumented} appear on no page of README.md or docs/"


def subparser(command: str):
    from gradwatch.cli import main as cli

    return cli, cli._commands(cli.build_parser(command))[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_cli_option_is_documented(command):
    """`--help` is the reference, but an option no page mentions is one a reader never hears of."""
    _, sub = subparser(command)
    text = "\n".join(page_text(p) for p in DOC_PAGES)
    options = [a.option_strings for a in sub._actions if a.option_strings and "--help" not in a.option_strings]
    missing = [o for o in options if not any(re.search(rf"{re.escape(s)}\b", text) for s in o)]
    assert options and not missing, f"gradwatch {command}: {missing} on no page"


def command_lines(page: str) -> list[str]:
    """The `gradwatch ...` commands a page shows: lines of its plain code blocks, and inline code with
    at least one argument that is no option (`gradwatch export --tensorboard` in prose names an option)."""
    text = page_text(page)
    lines = [l.strip().removeprefix("$ ") for b in re.findall(r"```\n(.*?)```", text, re.S) for l in b.splitlines()]
    inline = [" ".join(m.split()) for m in re.findall(r"`(gradwatch [^`]+)`", text)]
    lines += [l for l in inline if any(not w.startswith("-") for w in l.split()[2:])]
    lines = [re.split(r"\s+#", l)[0].strip() for l in lines if l.startswith("gradwatch ")]
    return [l for l in lines if len(l.split()) > 2]


def usage(line: str) -> bool:
    """`gradwatch fix [--budget-steps N] ...`: a synopsis, not a command to type."""
    return bool(re.search(r"[\[|<]|\.\.\.", line))


@pytest.mark.parametrize("page", [p for p in DOC_PAGES if command_lines(p)])
def test_commands_shown_parse(page, capsys):
    """Each command a page shows parses with the real parser, and each option of a synopsis exists:
    no option a page uses was renamed or removed."""
    for line in command_lines(page):
        command = line.split()[1]
        cli, sub = subparser(command)
        if usage(line):
            options = re.findall(r"(?<![\w-])--?[a-z][\w-]*", line.split(" -- ")[0].split(" -m ")[0])
            unknown = [o for o in options if o not in sub._option_string_actions]
            assert not unknown, f"{page}: `{line}` shows options gradwatch {command} does not have: {unknown}"
            continue
        try:
            cli.parse(cli.build_parser(command), shlex.split(line)[1:])
        except SystemExit:
            pytest.fail(f"{page}: `{line}` does not parse: {capsys.readouterr().err.strip()}")


def tables(text: str) -> list[list[str]]:
    out, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            rows.append(line.strip())
        elif rows:
            out, rows = out + [rows], []
    return out


@pytest.mark.parametrize("page", DOC_PAGES)
def test_tables_copied_from_results_match(page):
    """A page's table with the header of a benchmarks/RESULTS.md table is a copy of it: the same rows
    (docs/distributed.md's DDP table had kept an older run's numbers)."""
    results = {t[0]: t for t in tables((ROOT / "benchmarks/RESULTS.md").read_text())}
    for table in tables(page_text(page)):
        if table[0] in results:
            assert table == results[table[0]], f"{page}: {table[0][:60]}... differs from benchmarks/RESULTS.md"


def test_readme_repair_count_is_the_benchmarks():
    results = (ROOT / "benchmarks/RESULTS.md").read_text()
    ours, autotrainer = (re.search(rf"^\| {name} \| (\d+)/30 ", results, re.M).group(1)
                         for name in ("gradwatch", "AutoTrainer order"))
    readme = " ".join(page_text("README.md").split())
    assert f"it repairs {ours} (AutoTrainer's fixed order: {autotrainer})" in readme


def test_fix_doc_signature():
    text = " ".join(page_text("docs/fix.md").split())
    shown = re.search(r"`(gw\.fix\(command, \*.*?\))`", text)
    assert shown, "docs/fix.md shows no `gw.fix(command, *, ...)` signature"
    check(shown.group(1), gw.fix)


def test_example_models_read_as_their_docstring_says():
    """examples/models.py, which the README probes: the sigmoid MLP vanishes, the He-init ReLU MLP of the
    same depth does not, the tanh RNN forgets within its 50 steps (examples are run, not only read)."""
    import torch

    spec = importlib.util.spec_from_file_location("example_models", ROOT / "examples/models.py")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    torch.manual_seed(0)
    assert gw.probe(models.sigmoid_mlp(), torch.randn(32, 64), iters=0).verdict == "vanishing"
    assert gw.probe(models.relu_mlp(), torch.randn(32, 64), iters=0).verdict == "healthy"
    (recurrent,) = gw.probe(models.rnn(), torch.randn(32, 50, 8), iters=0).recurrent
    assert recurrent.direction == "vanishing" and recurrent.horizon < 50



def test_train_mlp_example_runs(monkeypatch, capsys):
    """examples/train_mlp.py, the README's first command, as a script: a few steps, both activations."""
    import runpy

    pytest.importorskip("sklearn")
    for act in ("sigmoid", "relu"):
        monkeypatch.setattr("sys.argv", ["train_mlp.py", "--act", act, "--steps", "2", "--depth", "2"])
        runpy.run_path(str(ROOT / "examples/train_mlp.py"), run_name="__main__")
        assert re.search(r"^accuracy \d\.\d{3}$", capsys.readouterr().out, re.M)


def test_remedies_cost_is_the_benchmarks():
    """docs/remedies.md's clipping costs are ratios of benchmarks/RESULTS.md's clipping table."""
    results = (ROOT / "benchmarks/RESULTS.md").read_text()
    table = next(t for t in tables(results) if t[0].startswith("| variant | median step"))
    ratios = {row.split("|")[-2].strip() for row in table[2:]}
    cost = page_text("docs/remedies.md").split("## Cost")[1].split("##")[0]
    quoted = re.findall(r"\b\d\.\d{3}\b", cost)
    assert quoted and set(quoted) <= ratios, set(quoted) - ratios
