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
import os
import re
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch

ENV_LOCATE_AT = "GRADWATCH_LOCATE_AT"  # the step (0-based, as stored) whose forward pass is checked
ORIGIN = "non-finite-origin.json"  # in the run directory of the locating run

# Their output is memory not yet written (nn.Linear's weight before its init): garbage, not a NaN made.
_UNWRITTEN = ("empty", "new_empty", "resize_")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OUR_DIR = os.path.dirname(gradwatch.__file__) + os.sep


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


@dataclass(frozen=True)
class Origin:
    op: str  # the aten operation, e.g. "aten.div.Tensor"
    file: str  # the script's file that ran it (the innermost frame outside torch and gradwatch)
    line: int
    code: str  # that line's text
    made_here: bool  # its inputs were finite: this operation made the NaN/Inf (else an input held it)
    value: str  # "NaN" or "Inf"
    gradient_of: str = ""  # in the backward pass: the autograd node (e.g. "SqrtBackward0"); the line made it

    def describe(self) -> str:
        where = f"{os.path.basename(self.file)}:{self.line}: `{self.code}`"
        if self.gradient_of:
            text = (f"the forward pass was finite, but the gradient was not: {self.gradient_of} ({self.op}) made the "
                    f"first {self.value}, the gradient of {where}")
        elif self.made_here:
            text = f"{self.op} made the first {self.value} from finite inputs, at {where}"
        else:
            return (f"an input of {self.op} already held {self.value} at {where}: it was made before this step's "
                    "computation (in the data, or in a tensor kept from earlier); check the batches where they are "
                    "made, e.g. `assert torch.isfinite(x).all()`")
        return text + (f"; {_GUARDS[self.kind]}" if self.kind in _GUARDS else "")

    @property
    def kind(self) -> str:
        """The operation's name without namespace or overload ("div"), or the node's ("sqrt")."""
        if self.gradient_of:
            return re.sub(r"Backward\d*$", "", self.gradient_of).lower()
        return self.op.split(".")[1] if self.op.count(".") >= 1 else self.op

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
        self._anomaly: tuple[bool, bool] | None = None

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
        if self.done or func.__name__.startswith(_UNWRITTEN):
            return out
        try:
            node = None if torch.is_grad_enabled() else torch._C._current_autograd_node()
            if (torch.is_grad_enabled() or node is not None) and (value := _non_finite(out)):
                self._found(func, args, kwargs or {}, value, node)
        except Exception:  # a tensor the check cannot read (a subclass, nested): the script's run goes on
            pass
        return out

    def _found(self, func, args, kwargs, value: str, node) -> None:
        frames = _traceback_frames(node.metadata.get("traceback_", ())) if node is not None else \
            [(f.filename, f.lineno or 0, f.line or "") for f in traceback.extract_stack()[:-2]]
        frame = next((f for f in reversed(frames) if not f[0].startswith((_TORCH_DIR, "<"))), None)
        if frame is not None and frame[0].startswith(_OUR_DIR):
            return  # the watch's own statistics (of a NaN activation, say) are not the script's
        self.done = True
        self._stop_anomaly()
        held = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and _non_finite(a)]
        if frame is None or any(isinstance(a, torch.nn.Parameter) for a in held):
            return  # no line of the script's, or the weights were already non-finite (an earlier step)
        self.origin = Origin(str(func), frame[0], frame[1], frame[2].strip(), made_here=not held, value=value,
                             gradient_of=node.name() if node is not None else "")
        if self.run_dir is not None:  # at once: the run may still die of the NaN it made
            self.origin.save(self.run_dir)


def _non_finite(value) -> str:
    """'NaN' or 'Inf' if a floating tensor (or one of a tuple's) holds one, else ''."""
    for t in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel() \
                and t.layout == torch.strided and not t.is_meta:
            if not bool(torch.isfinite(t).all()):
                return "NaN" if bool(torch.isnan(t).any()) else "Inf"
    return ""


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in [^\n]*\n(?P<code>[^\n]*)')


def _traceback_frames(formatted: list[str]) -> list[tuple[str, int, str]]:
    """(file, line, code) from the forward traceback anomaly mode keeps with a node (format_stack's text)."""
    return [(m["file"], int(m["line"]), m["code"]) for m in map(_FRAME.search, formatted) if m]
