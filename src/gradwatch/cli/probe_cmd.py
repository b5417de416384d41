"""gradwatch probe: gradient flow at initialisation, predicted from one random batch."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gradwatch import runner
from gradwatch.errors import ConfigError
from gradwatch.probe import probe
from gradwatch.probe.inputs import (LOSSES, check_fits, layout_note, load_factory, make_loss, parse_shape,
                                    random_batch)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        description="Build the model from FACTORY, run one random batch of --input-shape through it and "
                    "report per layer: activation statistics, ‖∂L/∂s‖ and ‖∂L/∂W‖, the Jacobian's top and "
                    "mean singular values, the mean-field prediction for MLPs, gradients through time for "
                    "recurrent layers, and a verdict with remedies. Definitions: docs/probe.md.")
    p.add_argument("factory", help="package.module:factory or path/to/file.py:factory, a callable returning "
                                   "an nn.Module (the current directory is importable)")
    p.add_argument("--input-shape", required=True, help="batch shape, batch size first, e.g. 32,3,32,32 (time "
                                                        "first, T,N,C, for an nn.RNN/GRU/LSTM with batch_first=False)")
    p.add_argument("--loss", default=None, choices=LOSSES,
                   help="projection (⟨r, y⟩/B with a fixed random r: ∂L/∂y independent of the weights, the "
                        "default), sumsq (½Σy²/B), mse (random normal targets), cross_entropy "
                        "(random labels; the default when --num-classes is given)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the output (implies cross_entropy)")
    p.add_argument("--vocab", type=int, default=None,
                   help="integer inputs in [0, VOCAB) (default for a model whose first module is an "
                        "nn.Embedding: its num_embeddings)")
    p.add_argument("--iters", type=int, default=30, help="Jacobian products per layer: 10 Lanczos steps (mean σ) then power iteration (top σ); "
                        "0 = gradient profile only (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of torch's RNG for the factory (its initialisation), "
                                                         "and of the batch, targets and probe vectors (default 0)")
    p.add_argument("--png", metavar="FILE", help="write the gradient and Jacobian profile by depth to FILE")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(func=main)


FIGURE_FORMATS = (".png", ".pdf", ".svg")


def figure_path(text: str) -> Path:
    """Where --png writes: a .png added to a name without a suffix; another format matplotlib
    writes (.pdf, .svg) kept; its directory created."""
    path = Path(text)
    if not path.suffix:
        path = path.with_suffix(".png")
    if path.suffix.lower() not in FIGURE_FORMATS:
        raise ConfigError(f"--png {text!r}: cannot write a {path.suffix} figure; use a .png, .pdf or .svg name")
    runner.output_dir(path.parent, "--png path")
    return path


@contextlib.contextmanager
def _progress():
    """A progress bar on stderr over the layers' Jacobian spectra (the slow part: --iters products per
    layer); it disappears when done. On a terminal only: a log or a pipe gets nothing."""
    err = Console(stderr=True)
    if not err.is_terminal:
        yield None
        return
    with Progress(TextColumn("Jacobian spectra"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                  TimeElapsedColumn(), TextColumn("{task.description}"), console=err, transient=True) as bar:
        task = bar.add_task("(forward and backward first)", total=None)
        yield lambda done, total, name: bar.update(task, completed=done, total=total, description=name)


def main(args: argparse.Namespace) -> int:
    shape = parse_shape(args.input_shape)
    if args.iters < 0:
        raise ConfigError(f"--iters {args.iters} must be >= 0")
    if not -2**63 <= args.seed < 2**63:
        raise ConfigError(f"--seed {args.seed}: pass an integer in [-2**63, 2**63)")
    if args.num_classes is not None and args.num_classes < 2:
        raise ConfigError(f"--num-classes {args.num_classes}: a classifier has at least 2 classes")
    png = figure_path(args.png) if args.png else None  # said before the probe's work, not after
    torch.manual_seed(args.seed)  # the factory's initialisation too: the same command gives the same numbers
    model = load_factory(args.factory)
    gen = torch.Generator().manual_seed(args.seed)
    try:
        batch = random_batch(model, shape, vocab=args.vocab, generator=gen)
    except RuntimeError as exc:  # e.g. DefaultCPUAllocator: can't allocate memory
        if "alloc" not in str(exc):
            raise
        raise ConfigError(f"--input-shape {args.input_shape}: a batch that large does not fit in memory; "
                          "a probe needs only a few samples (batch size first)") from None
    loss_name = args.loss or ("cross_entropy" if args.num_classes else "projection")
    loss_fn = make_loss(loss_name, args.num_classes, gen)
    check_fits(model, batch, args.factory)
    note = layout_note(model, shape)
    if note:
        print(f"gradwatch: {note}", file=sys.stderr)
    with _progress() as progress:
        result = probe(model, batch, loss_fn, iters=args.iters, seed=args.seed, progress=progress)
    result.loss_name = loss_name
    if png:
        result.plot(str(png))
    try:
        return _show(result, args, png)
    except BrokenPipeError:  # `gradwatch probe ... --json | head`: no traceback; exit 1 as rich does for
        _quiet_stdout()       # the table (and the Python docs' recipe)
        return 1


def _quiet_stdout() -> None:
    """After a broken pipe: stdout to /dev/null, so that the interpreter's last flush of what is still
    buffered does not print 'Exception ignored ... BrokenPipeError' (the Python docs' recipe)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _show(result, args: argparse.Namespace, png: Path | None) -> int:
    if args.json:
        print(result.to_json(indent=2))
        return 0
    console = Console(highlight=False, width=max(Console().width, 170))
    console.print(result.table())
    for line in result.summary_lines():
        console.print(line, markup=False)
    style = {"error": "bold red", "warning": "yellow", "info": "cyan"}
    for f in result.findings:
        console.print(f"[{style[f.severity]}]{f.severity.upper()}[/] {f.kind}: {f.message}")
        for cause in f.causes:
            console.print(f"  cause: {cause}", markup=False)
        for r in f.remedies:
            console.print(f"  fix: {r.action}\n       " + r.code.replace("\n", "\n       "), markup=False)
    if png:
        console.print(f"wrote {png}", markup=False)
    return 0
