"""gradwatch probe: gradient flow at initialisation, predicted from one random batch."""

from __future__ import annotations

import argparse

import torch
from rich.console import Console

from gradwatch.errors import ConfigError
from gradwatch.probe import probe
from gradwatch.probe.inputs import LOSSES, check_fits, load_factory, make_loss, parse_shape, random_batch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe", help="per-layer gradient flow at initialisation, from one random batch",
        description="Build the model from FACTORY, run one random batch of --input-shape through it and "
                    "report per layer: activation statistics, ‖∂L/∂s‖ and ‖∂L/∂W‖, the Jacobian's top and "
                    "mean singular values, the mean-field prediction for MLPs, gradients through time for "
                    "recurrent layers, and a verdict with remedies. Definitions: docs/probe.md.")
    p.add_argument("factory", help="package.module:factory, a callable returning an nn.Module "
                                   "(the current directory is importable)")
    p.add_argument("--input-shape", required=True, help="batch shape, batch size first, e.g. 32,3,32,32")
    p.add_argument("--loss", default=None, choices=LOSSES,
                   help="sumsq (½Σy²/B, the default), mse (random normal targets), cross_entropy "
                        "(random labels; the default when --num-classes is given)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the output (implies cross_entropy)")
    p.add_argument("--vocab", type=int, default=None,
                   help="integer inputs in [0, VOCAB) (default for a model whose first module is an "
                        "nn.Embedding: its num_embeddings)")
    p.add_argument("--iters", type=int, default=30, help="Jacobian products per layer: 10 Lanczos steps (mean σ) then power iteration (top σ); "
                        "0 = gradient profile only (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch, targets and probe vectors")
    p.add_argument("--png", metavar="FILE", help="write the gradient and Jacobian profile by depth to FILE")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    shape = parse_shape(args.input_shape)
    if args.iters < 0:
        raise ConfigError(f"--iters {args.iters} must be >= 0")
    model = load_factory(args.factory)
    gen = torch.Generator().manual_seed(args.seed)
    batch = random_batch(model, shape, vocab=args.vocab, generator=gen)
    loss_name = args.loss or ("cross_entropy" if args.num_classes else "sumsq")
    loss_fn = make_loss(loss_name, args.num_classes, gen)
    check_fits(model, batch, args.factory)
    result = probe(model, batch, loss_fn, iters=args.iters, seed=args.seed)
    if args.png:
        result.plot(args.png)
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
    if args.png:
        console.print(f"wrote {args.png}", markup=False)
    return 0
