"""The names a training script gives its model and optimizer, read from its source (never run), so
that the change `fix` prints can be pasted into it as it is: `opt.param_groups` where the script
calls its optimizer `opt`, `self.model.rnn` where its RNN sits there, `lr` where it updates the
weights itself (`p -= lr * p.grad`). Where the source does not say
reliably (no source, parameters gathered from several modules), the generic names stay, and a
comment says what they stand for. With several optimizers (a GAN's `opt_d` and `opt_g`), each is
named with its own model, as the trial changed each."""

from __future__ import annotations

import ast
import inspect
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from gradwatch.diagnose.advice import Context, module_ref

TORCH_OPTIMIZERS = frozenset(n for n, c in vars(torch.optim).items()
                             if isinstance(c, type) and issubclass(c, torch.optim.Optimizer))
PLACEHOLDERS = {"model": "your model (the nn.Module you train)", "optimizer": "its optimizer",
                "rnn": "your recurrent layer (an nn.RNN/GRU/LSTM)", "lstm": "your nn.LSTM"}
# A LightningModule builds its optimizer in configure_optimizers, which Lightning calls: the change
# to it goes there, on `self`'s parameters
LIGHTNING = {"model": "your LightningModule, before trainer.fit",
             "optimizer": "the one your configure_optimizers returns: make the change there, with self for model"}
# A Hugging Face Trainer builds its optimizer and schedule inside train(): an lr or a clip is an argument
HF_TRAINER = {"model": "the model you give the Trainer",
              "optimizer": "the Trainer's, built inside train(): give the lr as TrainingArguments(learning_rate=...) "
                           "and a norm clip as max_grad_norm=..."}


@dataclass(frozen=True)
class Names:
    """How the printed code reaches the user's model, optimizer and layers."""

    model: str = "model"
    optimizer: str = "optimizer"
    found: frozenset[str] = frozenset()  # of "model", "optimizer": read from the script
    batch: str = ""  # what the script calls the model with in training (`Xtr[idx]`), if found
    imported: frozenset[str] | None = None  # the names the script imports (None: not read)
    run: Context | None = field(default=None, compare=False)  # the baseline: its lr and layers
    group_lrs: tuple[float, ...] = ()  # the baseline's lr of each parameter group (its peak)
    update_lr: str = ""  # what a hand-written update multiplies the gradients by (`lr` in `p -= lr * p.grad`)
    update_lr_set: float | None = None  # the one number the script assigns to it (`lr = 0.5`), if so
    loads_weights: bool = False  # the script loads the model's weights (`model.load_state_dict`)
    initialised_at: int = 0  # the line of the script's own last initialisation (`nn.init.normal_`, `model.apply`)
    # the schedulers the script builds on its optimizer (class names), and the statement that builds
    # it when it is the one OneCycleLR or CyclicLR: they set the lr from their own arguments
    schedulers: frozenset[str] = frozenset()
    cyclic_build: str = ""
    # several optimizers (a GAN's): (optimizer, the module it trains, "" when not one) each, in the
    # order the script builds them; `model`/`optimizer` are then the first module trained and its own
    optimizers: tuple[tuple[str, str], ...] = ()
    lr_option: str = ""  # the command-line option the optimizer's lr comes from (`--lr`, for `lr=args.lr`)
    loaded: frozenset[str] = frozenset()  # the optimizers the script loads a state into (`opt.load_state_dict`)
    aimed: bool = False  # `model` is the one the findings name, not the first trained (several models)
    # the module the loop calls when the optimizers take parts of it (`model` for `model.head.parameters()`)
    called: str = ""
    lightning: bool = False  # the script defines configure_optimizers (a LightningModule's)
    hf_trainer: bool = False  # the script builds TrainingArguments (a Hugging Face Trainer's)
    batch_taken: bool = False  # the script binds `batch` itself (`def batch(n=64)`): the placeholder is renamed

    @property
    def changed(self) -> str:
        """The module a change to the model goes to: the one the trial changed, the first trained
        module the script calls, which may hold more than its optimizer trains (a frozen body)."""
        return self.called or self.model

    def aimed_at(self, name: str) -> Names:
        """The names with `model` the one the script calls `name` (`disc`, or `self.disc`) and its optimizer."""
        opt, model = next(((o, m) for o, m in self.optimizers if m.split(".")[-1] == name), (self.optimizer, name))
        return replace(self, model=model, optimizer=opt, batch="", aimed=True, called="",
                       found=self.found | {"model", "optimizer"})

    def each_optimizer(self) -> list[Names]:
        """The names for each optimizer: a trial applies an optimizer remedy (clipping, an lr
        change, Adam) to every optimizer that steps, so the code does it to each."""
        if not self.optimizers:
            return [self]
        return [replace(self, model=model or "model", optimizer=opt, batch="",
                        found=frozenset({"optimizer", *(["model"] if model else [])}))
                for opt, model in self.optimizers]

    @property
    def optimizer_ready(self) -> str:
        """When an lr set on the optimizer holds: after a checkpoint's state is loaded into it too, since
        load_state_dict puts back the lr it saved (pasted before, the change is undone on resume)."""
        if self.optimizer in self.loaded:
            return f"after {self.optimizer} is built and its state loaded (load_state_dict puts back the lr it saved)"
        return f"after {self.optimizer} is built"

    @property
    def manual(self) -> bool:
        """The baseline updated the weights by hand (no optimizer stepped): no `optimizer` to name."""
        return self.run is not None and self.run.run.meta.get("optimizer") is None

    @property
    def before_update(self) -> str:
        """Where a gradient change goes: between the backward and the update it changes."""
        return "after loss.backward(), before your update" if self.manual else f"before {self.optimizer}.step()"

    @property
    def new_parameters(self) -> str:
        """When a change that adds parameters must be made, so that they are trained too."""
        if self.manual:
            return "before training: new parameters, for your update to reach"
        if self.called and self.optimizers:  # a change to the whole, which every optimizer trains a part of
            return f"before {' and '.join(opt for opt, _ in self.optimizers)} are built: new parameters"
        return f"before {self.optimizer} is built: new parameters"

    def ref(self, layer: str) -> str:
        """A module inside the model, by its recorded name: `rnn` -> `net.rnn`."""
        return self.changed + module_ref(layer)[len("model"):]

    def recurrent(self, *types: str) -> list[str]:
        """The recorded recurrent layers of these types, as code; a placeholder when none is known."""
        layers = [l.name for l in self.run.run.layers if l.role == "recurrent" and l.type in types] if self.run else []
        return [self.ref(n) for n in layers] or ["lstm" if types == ("LSTM",) else "rnn"]

    def lr_value(self, factor: float) -> str | None:
        """The lr the script's lr times `factor` gives (2.0 x0.1 -> "0.2"); None when not recorded,
        or when the parameter groups have lrs of their own (one value would flatten them)."""
        if self.run is None or not self.run.lr > 0 or len(set(self.group_lrs)) > 1 or self.optimizers:
            return None  # several optimizers: the lr recorded is one of theirs
        return self.run.lr_text(factor)

    @property
    def replaced_schedule(self) -> str:
        """The note beside a rebuilt `cyclic_build`: which line of the script it replaces."""
        return f"in place of your {self.cyclic_build.split('=')[0].strip()} = ... line"

    def scaled_schedule(self, factor: float) -> str | None:
        """The script's OneCycleLR/CyclicLR build with the lrs it sets from scaled by `factor`
        (max_lr, and CyclicLR's base_lr), as a line to put in its place; None when the script builds
        none, or gives them as anything but numbers (a variable: its value is unknown here)."""
        return self._rebuilt_schedule(lambda lrs: {k: [v * factor for v in vs] for k, vs in lrs.items()})

    def schedule_from(self, lr: float) -> str | None:
        """The same line for an optimizer that starts at `lr`, as the Adam trial followed the schedule
        (`inject._follow_schedule`): OneCycleLR's max_lr `lr`; CyclicLR's base_lr `lr`, its max_lr in
        the same ratio to it as the script's."""
        def start(lrs: dict[str, list[float]]) -> dict[str, list[float]] | None:
            # one value each: the printed Adam has one parameter group (model.parameters())
            if "base_lr" not in lrs:
                return {k: [lr] for k in lrs}
            if len(lrs) < 2 or len(lrs["base_lr"]) != len(lrs["max_lr"]) or 0 in lrs["base_lr"]:
                return None
            ratios = {float(f"{hi / lo:.3g}") for hi, lo in zip(lrs["max_lr"], lrs["base_lr"])}
            return {"base_lr": [lr], "max_lr": [lr * ratios.pop()]} if len(ratios) == 1 else None
        return self._rebuilt_schedule(start)

    def _rebuilt_schedule(self, change: Callable[[dict[str, list[float]]], dict[str, list[float]] | None]) -> str | None:
        """`cyclic_build` with its lr arguments (by name: each a list, one per group) replaced by
        `change` of them; None when there is none, or one of them is not given as numbers."""
        if not self.cyclic_build:
            return None
        statement = ast.parse(self.cyclic_build).body[0]
        call = statement.value
        names = CYCLIC_LRS[_callee(call)]
        given = {names[i]: (call.args, i) for i in range(len(call.args)) if i in names}
        given |= {k.arg: (k, "value") for k in call.keywords if k.arg in names.values()}
        nodes = {name: getattr(at, slot) if isinstance(slot, str) else at[slot] for name, (at, slot) in given.items()}
        lrs = {name: _numbers(node) for name, node in nodes.items()}
        if not lrs or any(v is None for v in lrs.values()):
            return None
        new = change(lrs)
        if new is None:
            return None
        for name, (at, slot) in given.items():
            node = _as_node(new[name], nodes[name])
            setattr(at, slot, node) if isinstance(slot, str) else at.__setitem__(slot, node)
        return ast.unparse(statement)

    def complete(self, code: str) -> str:
        """`code` with what it needs before it: the imports the script lacks and a comment for each
        placeholder it uses (a generic name, the batch)."""
        lines = []
        for module, line in (("gw", "import gradwatch as gw"), ("torch", "import torch"), ("nn", "from torch import nn")):
            missing = self.imported is None and module == "gw" or self.imported is not None and module not in self.imported
            if missing and _uses(code, module + "."):
                lines.append(line)
        if self.optimizers and MODEL_CHANGE.search(code) and "model" in self.found and not self.called:
            which = "the model the findings name" if self.aimed else "the first model your script trains"
            lines.append(f"# {self.model} only: {which}, the one the trial changed")
        if self.loads_weights and MODEL_CHANGE.search(code) and "new parameters" not in code:
            lines.append(f"# apply after {self.changed} is built and its weights loaded (load_state_dict), "
                         "before training: where the trial made it")
        elif self.initialised_at and MODEL_CHANGE.search(code) and "new parameters" not in code:
            lines.append(f"# apply after your own initialisation of the weights (line {self.initialised_at}), before "
                         "training: where the trial made it (before it, yours would undo the change's)")
        if "example_input=batch" in code:
            seen = f", as in {self.changed}({self.batch})" if self.batch else ", as the model takes it in training"
            held = "one_batch" if self.batch_taken else "batch"  # (pasted, `batch` was the script's function)
            code = code.replace("example_input=batch", f"example_input={held}")
            lines.append(f"# {held}: one input batch{seen}")
        said = {**PLACEHOLDERS, **LIGHTNING} if self.lightning else {**PLACEHOLDERS, **HF_TRAINER} if self.hf_trainer \
            else PLACEHOLDERS
        generic = [f"{n}: {what}" for n, what in said.items()
                   if n not in self.found | {self.called} and _uses(code, n)]
        if generic:
            lines.append(f"# {'; '.join(generic)} (not found in your script)")
        return "\n".join([*lines, code])


# The schedulers that set the lr from lrs of their own, not from the optimizer's: the arguments
# (by position after the optimizer, and by keyword) an lr scale must scale instead.
CYCLIC_LRS = {"OneCycleLR": {1: "max_lr"}, "CyclicLR": {1: "base_lr", 2: "max_lr"}}
SCHEDULERS = frozenset(n for n, c in vars(torch.optim.lr_scheduler).items()
                       if isinstance(c, type) and (issubclass(c, torch.optim.lr_scheduler.LRScheduler)
                                                   or n == "ReduceLROnPlateau"))


def _numbers(node: ast.expr) -> list[float] | None:
    """A number, or a list/tuple of numbers (one per group), as a list; None for anything else."""
    items = node.elts if isinstance(node, (ast.List, ast.Tuple)) else [node]
    numbers = [e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, (int, float))
               and not isinstance(e.value, bool)]
    return [float(v) for v in numbers] if items and len(numbers) == len(items) else None


def _as_node(values: list[float], like: ast.expr) -> ast.expr:
    """`values` written as `like` was, a list/tuple of them or one number (also for one value: a
    schedule takes one number for every group)."""
    numbers = [ast.Constant(float(f"{v:.3g}")) for v in values]
    return type(like)(elts=numbers, ctx=ast.Load()) if isinstance(like, (ast.List, ast.Tuple)) and len(numbers) > 1 \
        else numbers[0]


# a change to the model's modules or weights, which must come after the weights a checkpoint loads
MODEL_CHANGE = re.compile(r"gw\.modify\.|gw\.init_\(|nn\.init\.")


def _uses(code: str, name: str) -> bool:
    """`name` stands on its own in `code` (`rnn.`, not `model.rnn.`; `nn.`, not `torch.nn.`)."""
    return re.search(rf"(?<![\w.]){re.escape(name)}\b" if not name.endswith(".") else
                     rf"(?<![\w.]){re.escape(name)}", code) is not None


def _imports(node: ast.AST) -> set[str]:
    """The names the imports under `node` bind whatever branch runs: not those under an `if` (a
    script importing gradwatch only `if args.watch:` was told no `import gradwatch as gw`, and
    the pasted change failed with a NameError)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, ast.If) and not _is_main(node.test):
        return set()
    return {name for child in ast.iter_child_nodes(node) for name in _imports(child)}


def _is_main(test: ast.expr) -> bool:
    """`__name__ == "__main__"`: the script's own run, where the change is pasted too."""
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def read_names(source: str, run: Context | None = None, imported: frozenset[str] = frozenset()) -> Names:
    """The names in `source` (a script, or a training function's own code). `imported`: names bound
    around the source (a function's module globals)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return Names(run=run)
    nodes = list(ast.walk(tree))
    lightning = any(isinstance(n, ast.FunctionDef) and n.name == "configure_optimizers" for n in nodes)
    taken = any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == "batch"
                or isinstance(n, ast.Name) and n.id == "batch" and isinstance(n.ctx, ast.Store) for n in nodes)
    # TrainingArguments and its kin (Seq2SeqTrainingArguments; TRL's SFTConfig, DPOConfig) beside a *Trainer
    calls = [_callee(n) for n in nodes if isinstance(n, ast.Call)]
    hf_trainer = any(c.endswith("TrainingArguments") for c in calls) \
        or any(c.endswith("Config") for c in calls) and any(c.endswith("Trainer") for c in calls)
    return replace(_read_names(tree, run, imported), initialised_at=_initialised_at(tree), lightning=lightning,
                   batch_taken=taken or "batch" in imported, hf_trainer=hf_trainer)


_INIT_CALL = re.compile(r"(^|\.)init\.\w+_$")  # nn.init.normal_, torch.nn.init.xavier_uniform_, init.zeros_
_FILLS = ("normal_", "uniform_", "zero_", "fill_", "constant_", "trunc_normal_", "orthogonal_")


def _initialised_at(tree: ast.AST) -> int:
    """The line of the script's last statement that initialises weights its own way (0: none): an
    `nn.init` function (also one imported from it by name), a fill of a weight in place
    (`m.weight.data.normal_(0, 1)`, `p.uniform_()` over `model.parameters()`), or
    `model.apply(init_fn)`. Calls inside a function named for it (`def init_weights(m)`) or a class
    body (a module's own `__init__`) are where it is defined, not done: the `.apply` or the
    construction is. A model change pasted above that line would be undone by it; the trial made it
    at the first forward, after it."""
    by_name = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.module == "torch.nn.init" for a in node.names}
    lines: list[int] = []

    def visit(node: ast.AST, over_parameters: bool) -> None:
        if isinstance(node, ast.ClassDef) or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                and "init" in node.name.lower():
            return
        if isinstance(node, (ast.For, ast.AsyncFor)) and "parameters()" in ast.unparse(node.iter):
            over_parameters = True
        if isinstance(node, ast.Call) and _initialises(node, by_name, over_parameters):
            lines.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, over_parameters)

    visit(tree, False)
    return max(lines, default=0)


def _initialises(call: ast.Call, by_name: set[str], over_parameters: bool) -> bool:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id in by_name
    if not isinstance(func, ast.Attribute):
        return False
    if _INIT_CALL.search(ast.unparse(func)):
        return True
    if func.attr == "apply":  # model.apply(init_fn), not an autograd Function's apply(x)
        return len(call.args) == 1 and "init" in ast.unparse(call.args[0]).lower()
    receiver = ast.unparse(func.value)
    if "grad" in receiver:  # p.grad.zero_(): a loop by hand clearing gradients, not weights
        return False
    return func.attr in _FILLS and (over_parameters or re.search(r"\.(weight|bias|data)\b", receiver) is not None)


def _read_names(tree: ast.AST, run: Context | None, imported: frozenset[str]) -> Names:
    classes = {run.run.meta["optimizer"]} if run and run.run.meta.get("optimizer") else TORCH_OPTIMIZERS
    reader = _Reader(classes, _factories(tree, classes))
    reader.visit(tree)
    binds = imported | _imports(tree)
    targets = {target for target, _ in reader.builds}
    if not targets and reader.update_lrs:  # no optimizer: the weights are updated by hand
        return _by_hand(tree, reader, binds, run)
    if len(targets) > 1:  # several optimizers (a GAN's two)
        return _several(reader, binds, run)
    if not targets:
        return Names(imported=binds, run=run)
    optimizer = targets.pop()
    built = [(kind, line) for kind, line, on in reader.schedules if on == optimizer]
    schedule = {"schedulers": frozenset(kind for kind, _ in built),
                "cyclic_build": next((line for kind, line in built if kind in CYCLIC_LRS), "") if len(built) == 1 else "",
                "lr_option": reader.lr_option(optimizer), "loaded": reader.loaded()}
    models = {None if model in reader.parts and not reader.batch(model) else model for _, model in reader.builds}
    if len(models) != 1 or None in models:
        return Names(optimizer=optimizer, found=frozenset({"optimizer"}), imported=binds, run=run, **schedule)
    model = models.pop()
    called = _called(reader, [model])
    return Names(model, optimizer, frozenset({"model", "optimizer"}), reader.batch(called or model), binds, run,
                 loads_weights=reader.loads_weights(called or model), called=called, **schedule)


def _several(reader: _Reader, binds: frozenset[str], run: Context | None) -> Names:
    """Several optimizers: each with the module it trains; the model is the first module trained
    (a trial changes that one only), with its own optimizer."""
    built = dict(reader.builds)  # the last build of each, in the order first built
    optimizers = tuple((opt, model or "") for opt, model in built.items())
    first = _first_trained([m for _, m in optimizers if m], reader, run)
    called = _called(reader, [m for _, m in optimizers])
    if first is None:
        return Names(imported=binds, run=run, optimizers=optimizers, loaded=reader.loaded(), called=called,
                     batch=reader.batch(called), loads_weights=bool(called) and reader.loads_weights(called))
    optimizer = next(opt for opt, model in optimizers if model == first)
    return Names(first, optimizer, frozenset({"model", "optimizer"}), reader.batch(called or first), binds, run,
                 loads_weights=reader.loads_weights(called or first), optimizers=optimizers, loaded=reader.loaded(),
                 called=called)


def _called(reader: _Reader, models: list[str]) -> str:
    """The module the loop calls, of which each of `models` (what the optimizers train) is a part:
    `model` for `model.head.parameters()` with the loop calling `model(x)`. The trial changes the
    first module trained, the whole of it (a frozen body too), so a model change names it. "" when
    a model is called itself, or is not one module."""
    if not models or any(not m or reader.batch(m) for m in models):
        return ""
    chains = [_chain(ast.parse(m, mode="eval").body) for m in models]
    common = os.path.commonprefix(chains)
    return next((c for c in reversed(common) if c not in models and reader.batch(c)), "")


def _first_trained(models: list[str], reader: _Reader, run: Context | None) -> str | None:
    """Which of `models` the script trains first: the watch names the layers of every model after
    the first by the model's name (`disc.0`), so the one no layer is named after; else the first
    called in the source, outside no_grad. None when neither says."""
    if run is not None:
        named = {l.name.split(".")[0] for l in run.run.layers if "." in l.name}
        unnamed = {m for m in models if m.split(".")[-1] not in named}
        if len(unnamed) == 1:
            return unnamed.pop()
    return next((func for func, _ in reader.calls if func in models), None)


def _by_hand(tree: ast.AST, reader: _Reader, binds: frozenset[str], run: Context | None) -> Names:
    """A script that updates its weights itself (`p -= lr * p.grad`): the model is the one module
    whose parameters it reads, the learning rate what its updates multiply the gradients by."""
    lrs = set(reader.update_lrs)
    lr = lrs.pop() if len(lrs) == 1 else ""
    value = _number_set(tree, lr) if lr else None
    if len(reader.owners) != 1:
        return Names(imported=binds, run=run, update_lr=lr, update_lr_set=value)
    model = next(iter(reader.owners))
    return Names(model, found=frozenset({"model"}), batch=reader.batch(model), imported=binds, run=run,
                 update_lr=lr, update_lr_set=value, loads_weights=reader.loads_weights(model))


def _number_set(tree: ast.AST, name: str) -> float | None:
    """The number `name` holds when the source sets it once, to a number (`lr = 0.5`); else None."""
    sets = [node for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
            and name in [ast.unparse(t) for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]]
    value = sets[0].value if len(sets) == 1 and isinstance(sets[0], ast.Assign) else None
    number = isinstance(value, ast.Constant) and isinstance(value.value, (int, float)) and not isinstance(value.value, bool)
    return float(value.value) if number else None


def _factories(tree: ast.AST, classes: frozenset[str] | set[str]) -> dict[str, tuple[list[str], ast.Call]]:
    """The script's functions that build and return an optimizer (`def make_opt(model, lr): return
    torch.optim.SGD(model.parameters(), lr=lr)`), by name: their parameters and the build, so that
    `opt = make_opt(net, 0.1)` names `opt` the optimizer, of `net`."""
    found = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        built = {ast.unparse(n.targets[0]): n.value for n in ast.walk(node)
                 if isinstance(n, ast.Assign) and len(n.targets) == 1 and _callee(n.value) in classes}
        returns = [n.value for n in ast.walk(node) if isinstance(n, ast.Return) and n.value is not None]
        calls = [r if _callee(r) in classes else built.get(ast.unparse(r)) for r in returns]
        if len(calls) == 1 and calls[0] is not None:
            found[node.name] = ([a.arg for a in node.args.posonlyargs + node.args.args], calls[0])
    return found


class _Reader(ast.NodeVisitor):
    """The optimizer builds (`opt = torch.optim.SGD(net.parameters(), ...)`: target, model), the
    calls made outside no_grad blocks (callee, first argument), the modules whose parameters are
    read (`net.parameters()`) and the learning rates of hand-written updates of a source."""

    def __init__(self, classes: frozenset[str] | set[str], factories: dict[str, tuple[list[str], ast.Call]]):
        self.classes = classes
        self.factories = factories
        self.builds: list[tuple[str, str | None]] = []
        self.calls: list[tuple[str, str]] = []
        self.owners: set[str] = set()
        self.update_lrs: list[str] = []
        self.build_lrs: dict[str, str] = {}  # optimizer -> the lr it is built with, as written (`args.lr`)
        self.options: dict[str, str] = {}  # argparse dest -> its option (`lr` -> `--lr`)
        self.parts: set[str] = set()  # modules an optimizer took the parameters of in parts
        self.schedules: list[tuple[str, str, str]] = []  # (class, the statement, the optimizer it is built on)
        self._scopes: list[ast.AST] = []
        self._no_grad = 0

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if node.name in self.factories:  # its build is counted where it is called
            return
        self._scopes.append(node)
        self.generic_visit(node)
        self._scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Assign(self, node: ast.Assign) -> None:
        if len(node.targets) == 1:
            self._build(node.targets[0], node.value)
        if _callee(node.value) in SCHEDULERS:
            call = node.value
            on = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "optimizer"), None)
            self.schedules.append((_callee(call), ast.unparse(node), ast.unparse(on) if on is not None else ""))
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._build(node.target, node.value)
        self.generic_visit(node)

    def visit_With(self, node: ast.With) -> None:
        quiet = any(_callee(item.context_expr) in ("no_grad", "inference_mode") for item in node.items)
        self._no_grad += quiet
        self.generic_visit(node)
        self._no_grad -= quiet

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            self._option(node)
        if not self._no_grad and node.args:
            self.calls.append((ast.unparse(node.func), ast.unparse(node.args[0])))
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("parameters", "named_parameters"):
            self.owners.add(ast.unparse(node.func.value))
        if isinstance(node.func, ast.Attribute) and node.func.attr == "sub_" and node.args:
            self._update(node.args[0])  # p.sub_(lr * p.grad)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.op, ast.Sub):
            self._update(node.value)  # p -= lr * p.grad
        self.generic_visit(node)

    def _update(self, step: ast.expr) -> None:
        """`lr * p.grad` (or `p.grad * lr`): an update by hand, at the learning rate `lr`."""
        if isinstance(step, ast.BinOp) and isinstance(step.op, ast.Mult):
            for grad, lr in ((step.right, step.left), (step.left, step.right)):
                if isinstance(grad, ast.Attribute) and grad.attr == "grad":
                    self.update_lrs.append(ast.unparse(lr))
                    return

    def batch(self, model: str) -> str:
        """What the model is called with in training (`Xtr[idx]`); "" when not seen."""
        return next((arg for func, arg in self.calls if func == model), "")

    def loads_weights(self, model: str) -> bool:
        return any(func == f"{model}.load_state_dict" for func, _ in self.calls)

    def loaded(self) -> frozenset[str]:
        """The optimizers the source loads a state into."""
        return frozenset(opt for opt, _ in self.builds if self.loads_weights(opt))

    def _option(self, call: ast.Call) -> None:
        """`parser.add_argument("--lr", "-l", dest=...)`: its dest, as argparse derives it."""
        flags = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        long = [f for f in flags if f.startswith("--")]
        dest = next((k.value.value for k in call.keywords if k.arg == "dest" and isinstance(k.value, ast.Constant)),
                    (long or flags or [""])[0].lstrip("-").replace("-", "_"))
        if flags and flags[0].startswith("-") and dest:
            self.options[dest] = (long or flags)[0]

    def lr_option(self, optimizer: str) -> str:
        """The option the optimizer's lr is read from (`--lr` for `lr=args.lr`); "" when not one."""
        expr = ast.parse(self.build_lrs[optimizer], mode="eval").body if optimizer in self.build_lrs else None
        return self.options.get(expr.attr, "") if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) else ""

    def _build(self, target: ast.expr, value: ast.expr | None) -> None:
        if not isinstance(target, (ast.Name, ast.Attribute)):
            return
        if _callee(value) in self.classes:
            lr = value.args[1] if len(value.args) > 1 else next((k.value for k in value.keywords if k.arg == "lr"), None)
            if lr is not None:
                self.build_lrs[ast.unparse(target)] = ast.unparse(lr)
            self.builds.append((ast.unparse(target), self._model(target, value)))
        elif _callee(value) in self.factories:  # opt = make_opt(net, 0.1): the factory's model, as passed in
            params, build = self.factories[_callee(value)]
            model = self._model(target, build)
            head = model.split(".")[0].split("[")[0] if model else None
            passed = dict(zip(params, map(ast.unparse, value.args)))
            passed |= {k.arg: ast.unparse(k.value) for k in value.keywords if k.arg}
            if head in params:
                model = passed[head] + model[len(head):] if head in passed else None
            self.builds.append((ast.unparse(target), model))

    def _model(self, target: ast.expr, call: ast.Call) -> str | None:
        """What the optimizer's parameters come from, when it is one module (`net.parameters()`).
        Built in a method (`self.optimizer = SGD(model.parameters())` in `__init__`), the module
        as the other methods reach it: `self.model`, where the method stores it there."""
        params = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "params"), None)
        bound = _comprehended(params) if params is not None else {}
        chains = {tuple(bound[chain[0]] or ("",)) if chain[0] in bound else tuple(chain)
                  for n in (ast.walk(params) if params is not None else ())
                  if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                  and n.func.attr in ("parameters", "named_parameters") and (chain := _chain(n.func.value))}
        if not chains or any(not c[0] or not c[0].isidentifier() for c in chains):
            return None  # (a piece of nothing read as a module, `getattr(net, k)`: the loop's model is used)
        common = os.path.commonprefix(sorted(chains))
        if not common:
            return None
        owner = self._stored(target, common[-1])
        if len(chains) > 1:  # groups from parts of one module (`net[:-1]`, `net[-1]`): it, if the loop calls it
            self.parts.add(owner)
        return owner

    def _stored(self, target: ast.expr, owner: str) -> str:
        """`owner` as the other methods reach it: `self.model` where the method stores it there."""
        if isinstance(target, ast.Attribute) and self._scopes:
            holder = ast.unparse(target.value)
            for node in ast.walk(self._scopes[-1]):
                if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Attribute)
                        and ast.unparse(node.targets[0].value) == holder and ast.unparse(node.value) == owner):
                    return ast.unparse(node.targets[0])
        return owner


def _comprehended(node: ast.expr) -> dict[str, list[str] | None]:
    """The names a comprehension in `node` binds to the pieces of a module, each with the chain of
    that module: `m` in `[{"params": m.parameters()} for i, m in enumerate(model)]` is a piece of
    `model` (read as the model, `m` was printed in the change: a NameError pasted). `zip` binds by
    position, `enumerate` its second name; a literal list of pieces (`[net.enc, net.dec]`) is a piece
    of what they share; an inner comprehension's source may be an outer one's name. None for a
    name bound to nothing read as a module."""
    bound: dict[str, list[str] | None] = {}
    for comp in (c for n in ast.walk(node) if isinstance(n, (ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.DictComp))
                 for c in n.generators):
        pairs = [(comp.target, comp.iter)]
        if _callee(comp.iter) == "enumerate" and comp.iter.args and isinstance(comp.target, ast.Tuple) \
                and len(comp.target.elts) == 2:
            pairs = [(comp.target.elts[1], comp.iter.args[0])]
        elif _callee(comp.iter) == "zip" and isinstance(comp.target, ast.Tuple) \
                and len(comp.target.elts) == len(comp.iter.args):
            pairs = list(zip(comp.target.elts, comp.iter.args))
        for target, source in pairs:
            chain = _module_chain(source, bound)
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    bound[name.id] = chain
    return bound


def _module_chain(source: ast.expr, bound: dict[str, list[str] | None]) -> list[str] | None:
    """The chain of the module whose pieces `source` yields (`model`, `model.children()`,
    `list(model)`, `[model[0], model[2]]`), through names bound before; None where none is read."""
    while isinstance(source, ast.Call) and _callee(source) in ("list", "reversed", "tuple") and source.args:
        source = source.args[0]
    if isinstance(source, ast.Call) and isinstance(source.func, ast.Attribute):  # model.children(), .modules()
        source = source.func.value
    if isinstance(source, (ast.List, ast.Tuple)):
        chains = [_module_chain(e, bound) for e in source.elts]
        if not chains or any(c is None for c in chains):
            return None
        common = os.path.commonprefix(chains)
        return list(common) or None
    if not isinstance(source, (ast.Name, ast.Attribute, ast.Subscript)):
        return None
    chain = _chain(source)
    root = chain[0]
    if root in bound:
        outer = bound[root]
        return None if outer is None else outer  # (a piece of a piece: of the outer module)
    return chain


def _chain(node: ast.expr) -> list[str]:
    """The expressions leading to `node`, outermost first: `net.head[0]` -> net, net.head, net.head[0]."""
    inner = _chain(node.value) if isinstance(node, (ast.Attribute, ast.Subscript)) else []
    return [*inner, ast.unparse(node)]


def _callee(node: ast.expr | None) -> str:
    """The last name of what a call calls (`torch.optim.SGD(...)` -> "SGD"); "" for no call."""
    if not isinstance(node, ast.Call):
        return ""
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def script_names(command: list[str] | Callable[[], object], run: Context | None = None) -> Names:
    """The names in what `fix` runs: the script of `python script.py` / `python -m module`, or a
    training function's own source (`gw.fix(train_fn)`); generic ones where neither is readable."""
    if callable(command):
        try:
            source = textwrap.dedent(inspect.getsource(command))
        except (OSError, TypeError):
            return Names(run=run)
        return read_names(source, run, frozenset(getattr(command, "__globals__", {})))
    path = script_path(command, Path.cwd())
    if path is None:
        return Names(run=run)
    try:
        return read_names(path.read_text(encoding="utf-8"), run)
    except (OSError, UnicodeDecodeError):
        return Names(run=run)


def script_path(command: list[str], cwd: Path) -> Path | None:
    """The Python file `python [options] script.py ...` or `python -m module ...` runs; None for
    other commands (`python -c`, a shell script, a launcher)."""
    if not command or not Path(command[0]).name.startswith("python"):
        return None
    args = command[1:]
    while args and args[0].startswith("-") and args[0] not in ("-m", "-c", "-"):
        args = args[2:] if args[0] in ("-W", "-X") else args[1:]  # these two take a value
    if not args or args[0] in ("-c", "-"):
        return None
    if args[0] == "-m":
        return module_path(args[1], cwd) if len(args) > 1 else None
    path = cwd / args[0]
    return path if path.is_file() else None


def module_path(name: str, cwd: Path) -> Path | None:
    """The file `python -m name` runs, looked for where Python looks (the working directory first),
    without importing anything."""
    parts = name.split(".")
    for base in [cwd, *(Path(p) for p in sys.path if p)]:
        for path in (base.joinpath(*parts[:-1], parts[-1] + ".py"), base.joinpath(*parts, "__main__.py")):
            if path.is_file():
                return path
    return None


_GENERIC = {name: re.compile(rf"(?<![\w.]){name}(?!\w)") for name in ("model", "optimizer")}
_KEYWORD = re.compile(r"\s*=(?!=)")  # after a name: `optimizer=` is the callee's keyword, not the script's name


def _renamed(code: str, pattern: re.Pattern, own: str) -> str:
    """Each use of the generic name as a value renamed; a keyword argument (`replace_rnn(model,
    optimizer=optimizer)`) keeps its name: a tester's pasted `replace_rnn(model, opt=opt)` raised."""
    def one(m: re.Match) -> str:
        keyword = re.search(r"[(,]\s*$", code[:m.start()]) and _KEYWORD.match(code, m.end())
        return m.group(0) if keyword else own
    return pattern.sub(one, code)


def in_script_names(code: str, names: Names, layers: tuple[str, ...] = (), later_models: tuple[str, ...] = ()) -> str:
    """`code` written for the generic `model` and `optimizer` (diagnose's remedies), with the names
    the script gives them where it says them: a tester's pasted `gw.init_(model)` raised a NameError
    in a script whose model is `net`. A finding in a later model (its layers `netD.0`: the watch
    names the layers of every model after the first as the script calls it, `later_models`) gets
    that model and the optimizer that trains it; one in the first, the model trained that is none
    of the later ones, if one is; else the code stays generic."""
    trained = [m.split(".")[-1] for _, m in names.optimizers if m]
    heads = {l.split(".")[0] for l in layers}
    if len(heads) == 1 and all("." in l for l in layers) and heads <= set(trained) & set(later_models):
        names = names.aimed_at(heads.pop())
    elif len(names.optimizers) > 1:
        first = {m for m in trained if m not in later_models}
        if len(first) != 1:
            return code
        names = names.aimed_at(first.pop())
    for generic, pattern in _GENERIC.items():
        own = getattr(names, generic)
        if generic in names.found and own != generic:
            code = _renamed(code, pattern, own)
    return code
