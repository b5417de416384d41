"""gradwatch export: a recorded run in another tool's format (TensorBoard)."""

from __future__ import annotations

import argparse
import shlex

from gradwatch.cli import say
from gradwatch.store import end_note, store_files
from gradwatch.store.reader import connect, damaged_store, read_meta, run_is_live


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        description="Write a recorded run as TensorBoard event files: one scalar per layer and metric "
                    "(grad_norm/<layer>, update_ratio/<layer>, ...; gradient norms are taken before "
                    "clipping), loss, lr, and the findings as text. Needs the tensorboard package.")
    p.add_argument("run", help="run directory or .sqlite store")
    p.add_argument("--tensorboard", metavar="LOGDIR", required=True, help="TensorBoard log directory to write")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gradwatch.integrations.tensorboard import export

    path = store_files(args.run)[0]
    with damaged_store(path):  # a store damaged past its first pages: one line, not a traceback
        n = export(args.run, args.tensorboard, progress=say)
        db = connect(path)
        try:
            meta = read_meta(db)
            last = db.execute("SELECT max(step) FROM steps").fetchone()[0]
        finally:
            db.close()
    meta["live"] = run_is_live(path.parent)
    note = end_note(meta, last)
    if note:
        say(f"partial run: {note}")
    print(f"Wrote {n} step{'s' * (n != 1)} to TensorBoard logs in {args.tensorboard} "
          f"(view: tensorboard --logdir {shlex.quote(str(args.tensorboard))})")
    return 0
