"""The live status line: one line on stderr, rewritten in place at each flush.

A `Watch` installs it when stderr is a terminal (or with `status=True`); a `StatusLine` installed
by hand draws on its stream, control codes included, whether or not that is a terminal.

    gradwatch  step 1200  loss 0.4312  grad min/max 3.1e-05 in 'fc0'  findings 1

"grad min/max" is the smallest layer gradient norm over the largest at the last recorded step
(layers with parameters), naming the weakest layer: near 1 is healthy, orders of magnitude below
is a gradient vanishing toward that layer; "non-finite" names a layer with NaN/Inf gradients.

The line never goes to stdout. When stdout is the same terminal, the script's own prints are
passed through a thin wrapper that erases the status line first and redraws it after each
complete line, so the two never share a line. The findings themselves are printed, once each,
by the watch's live diagnosis; the status line steps aside for them too.
"""

from __future__ import annotations

import math
import os
import sqlite3
import sys
from typing import TextIO

from gradwatch.integrations._rows import WatchStore, last_step, layer_roles

CLEAR = "\r\x1b[K"


def status_text(step: int, loss: float | None, grads: dict[str, float], n_findings: int) -> str:
    parts = [f"gradwatch  step {step}"]
    if loss is not None:  # the store keeps a NaN loss as +inf: "loss inf" was as often a NaN
        parts.append(f"loss {loss:.4g}" if math.isfinite(loss) else "loss non-finite")
    bad = [name for name, v in grads.items() if not math.isfinite(v)]
    if bad:
        parts.append(f"grad non-finite ({bad[0]}{', ...' if len(bad) > 1 else ''})")
    elif grads:
        weakest = min(grads, key=grads.get)
        top = max(grads.values())
        ratio = grads[weakest] / top if top > 0 else float("nan")
        parts.append(f"grad min/max {ratio:.1e} in '{weakest}'")  # (quoted: a Sequential's layer '2' read as a count)
    parts.append(f"findings {n_findings}")
    return "  ".join(parts)


def _same_terminal(a: TextIO, b: TextIO) -> bool:
    try:
        return a.isatty() and b.isatty() and os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (AttributeError, OSError, ValueError):
        return False


class _Stdout:
    """Wraps sys.stdout while the status line is shown: erase it before a write, redraw it after
    a complete line. Everything else goes to the real stream."""

    def __init__(self, stream: TextIO, status: "StatusLine"):
        self._stream, self._status = stream, status

    def write(self, text: str) -> int:
        self._status.clear()
        n = self._stream.write(text)
        if text.endswith("\n"):
            self._stream.flush()
            self._status.draw()
        return n

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class StatusLine:
    """A `Watch` flush callback. `live`: the watch's LiveDiagnosis (for the number of findings);
    `stream`: where to draw (stderr). `install(watch)` adds it to `watch.on_flush` and wraps
    stdout when it shares the terminal; `close()` ends the line and unwraps."""

    def __init__(self, live=None, stream: TextIO | None = None, width: int | None = None):
        self.live = live
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.text = ""
        self._shown = False
        self._store = WatchStore()
        self._stdout: _Stdout | None = None
        self._roles: dict[str, str] = {}

    def install(self, watch) -> "StatusLine":
        watch.on_flush.insert(0, lambda w: self.clear())  # findings printed at a flush get whole lines
        watch.on_flush.append(self)
        if _same_terminal(sys.stdout, self.stream):
            self._stdout = _Stdout(sys.stdout, self)
            sys.stdout = self._stdout
        return self

    def __call__(self, watch) -> None:
        try:  # a status line must never stop training
            db = self._store.connection(watch)
            row = last_step(db) if db is not None else None
            if row is not None and (not self._roles or any(l not in self._roles for l, _, _ in row.values)):
                self._roles = layer_roles(db)
        except sqlite3.Error:
            return
        if row is None:
            return
        grads = {layer: v for layer, metric, v in row.values
                 if metric == "grad_norm" and self._roles.get(layer) != "activation"}
        n = len(getattr(self.live, "findings", ()))
        self.text = status_text(row.step, row.loss, grads, n)
        self.draw()

    def _columns(self) -> int:
        if self.width:
            return self.width
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 100  # 0: a pty nobody sized
        except (AttributeError, OSError, ValueError):
            return 100

    def draw(self) -> None:
        if not self.text:
            return
        self.stream.write(CLEAR + self.text[: max(10, self._columns() - 1)])
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write(CLEAR)
            self.stream.flush()
            self._shown = False

    def close(self) -> None:
        """Leave the last status on its own line and give stdout back."""
        if self._stdout is not None and sys.stdout is self._stdout:
            sys.stdout = self._stdout._stream
        self._stdout = None
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
        self._store.close()
