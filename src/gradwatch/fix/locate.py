"""Find the operation that first made a NaN/Inf in a step, and the script's line that ran it.

The store says at which step a NaN/Inf first appeared and whether gradients grew before it; when
they did not, the NaN came from the data or the arithmetic of the model or the loss, and "look in
the data or the loss function" is all the store can say. A second run of the script up to that
step, with every operation of that step checked (a TorchDispatchMode: one host sync per operation,
for one step only), names the operation and the line: `loss = ... / yb.var()`, a division that
made an Inf; `xb = x[start:start + 64]`, a batch that already held NaN; or, for a forward pass that
was finite, the operation whose gradient was not (`d = (a - b).norm()` at a == b: NaN), its line
from the traceback autograd's anomaly mode keeps with each node (on for that step only).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import sysconfig
import traceback
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import gradwatch

ENV_LOCATE_AT = "GRADWATCH_LOCATE_AT"  # the step (0-based, as stored) whose operations are checked
ORIGIN = "non-finite-origin.json"  # in the run directory of the locating run

# Their output takes only the input's shape (backward's ones_like(loss)): no value of it went on.
_SHAPE_ONLY = ("new_", "empty", "zeros", "ones", "full")
# Their output is memory not yet written (nn.Linear's weight before its init): garbage, not a NaN made.
_UNWRITTEN = ("empty", "new_empty", "resize_")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OUR_DIR = os.path.dirname(gradwatch.__file__) + os.sep
# Python's own library (a DataLoader's worker queue, runpy): never the line to name; site-packages
# inside it is not skipped (a script of an installed package)
_STDLIB = tuple({sysconfig.get_paths()[k] + os.sep for k in ("stdlib", "platstdlib")})
_SITE = tuple({sysconfig.get_paths()[k] + os.sep for k in ("purelib", "platlib")})
# frames that only pass an operation on (the watch's mode around a compiled model's sampled step)
_PASS_THROUGH = ("__torch_function__", "__torch_dispatch__")
# the watch's wrappers of torch's own entry points (`torch.autograd.backward`): they only pass a call on
_PATCHES = os.path.join(_OUR_DIR, "collect", "patches.py")


# The usual guard for the operations that make NaN/Inf from finite inputs (or gradients).
_EPS = "a small eps (torch's norm layers use 1e-5)"
_GUARDS = {
    "div": f"a divisor that can be 0 (a batch's variance, a count, a norm) wants {_EPS} added, or `.clamp_min(eps)`",
    "sqrt": f"sqrt at 0 has an infinite gradient: `torch.sqrt(x + eps)` with {_EPS}, or the squared distance",
    "rsqrt": f"rsqrt at 0 is infinite: `torch.rsqrt(x + eps)` with {_EPS}",
    "log": "log of 0 or of a negative: `torch.log(x.clamp_min(eps))`, or a log-domain loss "
           "(`F.log_softmax`, `*_with_logits`)",
    "exp": "exp overflows above ~88 in float32: clamp its argument, or use a log-domain form (`torch.logsumexp`)",
    "pow": "a power of 0 or of a negative (x ** 0.5, x ** -1): add an eps or clamp the base",
    "acos": "acos/asin at ±1 has an infinite gradient: clamp the argument to (-1 + eps, 1 - eps)",
    "asin": "acos/asin at ±1 has an infinite gradient: clamp the argument to (-1 + eps, 1 - eps)",
}
GUARDED = frozenset(_GUARDS)  # the operations a guard on their line makes safe


@dataclass(frozen=True)
class Origin:
    op: str  # the aten operation, e.g. "aten.div.Tensor"
    file: str  # the file that ran it: the innermost frame outside torch, Python's library and the watch
    line: int
    code: str  # that line's text
    made_here: bool  # its inputs were finite: this operation made the NaN/Inf (else an input held it)
    value: str  # "NaN" or "Inf"
    gradient_of: str = ""  # in the backward pass: the autograd node (e.g. "SqrtBackward0"); the line made it
    masked: bool = False  # an input held ±inf on purpose (an attention mask): made from it, not from finite inputs
    # made in the forward of a module with no parameters and no submodules (an activation written as a
    # class: `class Exp(nn.Module)`): its class name, which a swap can replace (`candidates.from_origin`)
    module: str = ""

    def describe(self) -> str:
        where = f"{os.path.basename(self.file)}:{self.line}: `{self.code}`"
        if self.gradient_of:
            text = (f"the forward pass was finite, but the gradient was not: {self.gradient_of} ({self.op}) made the "
                    f"first {self.value}, the gradient of {where}")
        elif self.made_here:
            source = "an input masked with ±inf (a row masked whole?)" if self.masked else "finite inputs"
            text = f"{self.op} made the first {self.value} from {source}, at {where}"
        else:
            return (f"an input of {self.op} already held {self.value} at {where}: it was made before this step's "
                    "computation (in the data, or in a tensor kept from earlier); check the batches where they are "
                    "made, e.g. `assert torch.isfinite(x).all()`")
        return text + (f"; {_GUARDS[self.kind]}" if self.kind in _GUARDS else "")

    @property
    def kind(self) -> str:
        """The operation's name without namespace or overload ("div"), or the node's ("sqrt")."""
        if self.gradient_of:
            name = re.sub(r"Backward\d*$", "", self.gradient_of).lower()
        else:
            name = self.op.split(".")[1] if self.op.count(".") >= 1 else self.op
        name = name.rstrip("_")  # in place: x /= s is div_, log_() is log_
        return "div" if name == "reciprocal" else name  # 1 / x

    def save(self, run_dir: Path) -> None:
        (run_dir / ORIGIN).write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> Origin | None:
        path = run_dir / ORIGIN
        return cls(**json.loads(path.read_text())) if path.is_file() else None


class NonFiniteLocator(TorchDispatchMode):
    """Checks each floating output of each operation of the forward pass (grad enabled) and of the
    backward pass (inside an autograd node; not the optimizer's update) until one is NaN/Inf; then
    records `origin` and checks no more. An input that is a parameter already non-finite means the
    NaN came in an earlier step: no origin."""

    def __init__(self, run_dir: Path | None = None):
        super().__init__()
        self.run_dir = run_dir
        self.origin: Origin | None = None
        self.done = False
        # an input that already held NaN/Inf (`made_here` False) is the origin unless an operation of
        # the step then makes one from finite inputs: a script that marks missing values NaN and
        # cleans them before training held one first, and its log of a negative made the fault
        self._held = False
        self._carrying: dict[int, weakref.ref] = {}  # what carries the held NaN on (`_taint`)
        self._aside: tuple[Origin | None, dict] = (None, {})  # a held origin `_cleaned` put aside
        self._anomaly: tuple[bool, bool] | None = None
        # tensors holding ±inf on purpose: a mask filled with float("-inf") (causal attention,
        # key padding), and what is built from one; an Inf there is no fault, a NaN still is
        # (by id: a WeakSet compares tensors with ==, elementwise)
        self._masks: dict[int, weakref.ref] = {}

    def __enter__(self):
        self._anomaly = (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled())
        torch.set_anomaly_enabled(True, False)  # each node keeps its forward traceback; no raising
        return super().__enter__()

    def __exit__(self, *exc):
        self._stop_anomaly()
        return super().__exit__(*exc)

    def _stop_anomaly(self) -> None:
        if self._anomaly is not None:
            torch.set_anomaly_enabled(*self._anomaly)
            self._anomaly = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.done or func.__name__.startswith(_UNWRITTEN) or _in_worker():
            return out
        try:
            node = torch._C._current_autograd_node()  # (a backward with create_graph runs with grad on)
            if not (torch.is_grad_enabled() or node is not None):
                return out
            inputs = tree_leaves((args, kwargs or {}))  # (torch.stack's list of tensors too)
            if value := _non_finite(out):
                if value == "Inf" and (self._held or any(self._mask_value(a) for a in inputs)):
                    # (the data's NaN still held: an Inf made now is a mask's, -inf on purpose)
                    self._masks.update((id(t), weakref.ref(t)) for t in _tensors(out))
                elif self._held and any(_non_finite(a) for a in inputs if isinstance(a, torch.Tensor)):
                    self._taint(out)  # the held NaN carried on
                else:
                    self._found(func, args, kwargs or {}, value, node, out)
            elif self._held and node is None and any(t.is_floating_point() for t in _tensors(out)) \
                    and any(map(self._carries, inputs)) \
                    and not func.__name__.startswith(_SHAPE_ONLY) and "_like" not in func.__name__ \
                    and not script_line()[0].startswith(_OUR_DIR):  # (the watch's statistics of it are no fill)
                self._cleaned()  # the held NaN went no further (nan_to_num, a mean that skips it); in the
                # forward only: nll_loss's gradient is finite whatever log-probabilities it took
        except Exception:  # a tensor the check cannot read (a subclass, nested): the script's run goes on
            pass
        return out

    def _found(self, func, args, kwargs, value: str, node, out=None) -> None:
        live = [(f.filename, f.lineno or 0, f.line or "", f.name) for f in traceback.extract_stack()[:-2]]
        if node is not None and next((f for f in reversed(live) if _callers(f)), ("",))[0].startswith(_OUR_DIR):
            return  # the watch's own statistics in a backward hook (the node's traceback is the forward's)
        frames = _traceback_frames(node.metadata.get("traceback_", ())) if node is not None else live
        frame = next((f for f in reversed(frames) if _callers(f)), None)
        if frame is not None and frame[0].startswith(_OUR_DIR):
            return  # the watch's own statistics (of a NaN activation, say) are not the script's
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        masked = [a for a in tensors if self._mask_value(a)]
        held = [a for a in tensors if _non_finite(a) and not any(a is m for m in masked)]
        if frame is None or any(isinstance(a, torch.nn.Parameter) for a in held):
            self.done = True
            self._stop_anomaly()
            return  # no line of the script's, or the weights were already non-finite (an earlier step)
        self.done, self._held = not held, bool(held)
        if self.done:
            self._stop_anomaly()
        else:
            aside, carried = self._aside
            if aside is not None and any(alive_in(carried, a) for a in held):
                self.origin, self._carrying = aside, carried  # the NaN put aside came back: its origin
                self._taint(out)
                if self.run_dir is not None:
                    self.origin.save(self.run_dir)
                return
            self._taint(out)
        module = _activation_module(frame) if node is None and not held and not masked and _overflowed(func, args) else ""
        self.origin = Origin(str(func), frame[0], frame[1], frame[2].strip(), made_here=not held, value=value,
                             gradient_of=node.name() if node is not None else "", masked=bool(masked), module=module)
        if self.run_dir is not None:  # at once: the run may still die of the NaN it made
            self.origin.save(self.run_dir)

    def _cleaned(self) -> None:
        """The NaN the origin's output carried did not reach this output: it may be no origin. A
        script that marks missing values NaN and fills them, then overflows an exp, made its fault
        there. Kept aside, with what carried it: a finite part of the batch (its first 3 columns,
        a `nanmean` logged) is no fill, and when a tensor that carried it brings the NaN back
        (the model takes the whole batch), the origin is the one kept (`_found`). (Another slice of
        the dataset that held it is finite: no sign of anything.)"""
        self._aside = (self.origin, self._carrying)
        self.origin, self._held, self._carrying = None, False, {}
        if self.run_dir is not None:
            (self.run_dir / ORIGIN).unlink(missing_ok=True)

    def _taint(self, out) -> None:
        self._carrying.update((id(t), weakref.ref(t)) for t in _tensors(out))

    def _carries(self, a) -> bool:
        """`a` is the held origin's output, or made from it."""
        return alive_in(self._carrying, a)

    def _mask_value(self, a) -> bool:
        """±inf put there on purpose: a Python float (`masked_fill(m, float("-inf"))`, `torch.full`),
        a one-value tensor holding it, or a tensor built from such a mask."""
        if isinstance(a, float):
            return math.isinf(a)
        if isinstance(a, torch.Tensor):
            return alive_in(self._masks, a) or (a.numel() == 1 and _non_finite(a) == "Inf")
        return False


def alive_in(refs: dict[int, weakref.ref], a) -> bool:
    """`a` is the tensor `refs` holds under its id, still alive (tensors are kept by id and weak
    reference: a WeakSet compares them with ==, elementwise, and a dead one's id is reused)."""
    known = refs.get(id(a)) if isinstance(a, torch.Tensor) else None
    return known is not None and known() is a


def _tensors(value) -> list[torch.Tensor]:
    """An operation's output as tensors: it may return one, or a tuple or list of them."""
    return [t for t in (value if isinstance(value, (tuple, list)) else (value,)) if isinstance(t, torch.Tensor)]


def _non_finite(value) -> str:
    """'NaN' or 'Inf' if a floating tensor (or one of a tuple's) holds one, else ''."""
    for t in _tensors(value):
        if (t.is_floating_point() or t.is_complex()) and t.numel() and t.layout == torch.strided and not t.is_meta:
            if not bool(torch.isfinite(t).all()):
                return "NaN" if bool(torch.isnan(t).any()) else "Inf"
    return ""


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>[^\n]*)\n(?P<code>[^\n]*)')


def _traceback_frames(formatted: list[str]) -> list[tuple[str, int, str, str]]:
    """(file, line, code, function) from the forward traceback anomaly mode keeps with a node."""
    return [(m["file"], int(m["line"]), m["code"], m["name"]) for m in map(_FRAME.search, formatted) if m]


def _callers(frame: tuple[str, int, str, str]) -> bool:
    """A frame that can be the line to name: the script's, a library's, or the watch's own
    statistics; not torch's, Python's own library's, or one that only passes operations on."""
    file, _, _, name = frame
    if file.startswith((_TORCH_DIR, "<")) or (file.startswith(_STDLIB) and not file.startswith(_SITE)):
        return False
    return not (file.startswith(_OUR_DIR) and name in _PASS_THROUGH or file == _PATCHES)


# elementwise operations that overflow a finite input: an activation built on one is no activation to
# keep (a division or a log is a guard's business: a parameterless L2 normalisation divides too)
_OVERFLOWING = ("exp", "exp2", "expm1", "pow", "sinh", "cosh")


def _overflowed(func, args) -> bool:
    """`func` is an elementwise operation of `_OVERFLOWING` on one tensor, its output shaped as it."""
    name = func.__name__.split(".")[0].rstrip("_")
    return name in _OVERFLOWING and bool(args) and isinstance(args[0], torch.Tensor)


def _activation_module(frame: tuple[str, int, str, str]) -> str:
    """The class name of the module whose `forward(self, x)` is the running `frame`, when that module
    holds no parameters and no submodules: an activation written as a class, which a swap can
    replace. A loss module fits too, but a swap only reaches modules inside the model, between its
    layers; a forward of several inputs (an attention's q, k, v) is no activation."""
    file, line, _, name = frame
    f = sys._getframe()
    while f is not None and not (f.f_code.co_filename == file and f.f_lineno == line and f.f_code.co_name == name):
        f = f.f_back
    module = f.f_locals.get("self") if f is not None and name == "forward" else None
    if isinstance(module, torch.nn.Module) and f.f_code.co_argcount == 2 and not f.f_code.co_flags & 0x0C \
            and not any(True for _ in module.parameters()) and not any(True for _ in module.children()) \
            and _elementwise(module, f.f_locals.get(f.f_code.co_varnames[1])):
        return type(module).__name__
    return ""


def _elementwise(module: torch.nn.Module, x) -> bool:
    """`module` maps each element of an input shaped as `x`'s first sample on its own: changing one
    changes that output alone (a softmax written by hand, exp over a sum, changes them all, and a
    LeakyReLU in its place would change what the model computes). Its forward is called directly
    (no hook sees the probe), on numbers of a seeded generator of its own (the script's draws stay)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return False
    shape = x.shape if x.dim() <= 1 else (1, *x.shape[1:])  # (an unbatched vector is one sample)
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(x.dtype).to(x.device) * 0.1
    nudged = probe.clone()
    nudged.view(-1)[0] += 1.0
    try:
        with torch.no_grad():
            out, moved = type(module).forward(module, probe), type(module).forward(module, nudged)
    except Exception:  # a forward that wants more than one sample (a batch statistic)
        return False
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        return False
    changed = (out != moved).reshape(-1)
    return not bool(changed[1:].any())


def callers_frame(f) -> bool:
    """A live frame `_callers` takes (the line the locator would name, if innermost)."""
    return _callers((f.f_code.co_filename, f.f_lineno, "", f.f_code.co_name))


def script_line() -> tuple[str, int]:
    """(file, line) of the innermost frame the locator would name for an operation running now (the
    frame `_callers` takes: not torch's, Python's library's or a pass-through), ("", 0) for none.
    Walked frame by frame: a trial asks it of one operation each time it runs."""
    f = sys._getframe(1)
    while f is not None:
        if callers_frame(f):
            return f.f_code.co_filename, f.f_lineno
        f = f.f_back
    return "", 0


def _in_worker() -> bool:
    """A DataLoader worker (forked with the mode on): its batches are checked where the training
    process takes them, at the script's own line."""
    return torch.utils.data.get_worker_info() is not None
