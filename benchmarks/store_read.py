"""Peak memory and time of reading a long run's store (`read_run`), of `gradwatch show`'s streamed
summary of it, and of diagnosing it, each in
a fresh process (peak RSS: VmHWM, which starts afresh at exec, unlike `ru_maxrss`; the interpreter
with gradwatch imported is measured alone first and subtracted).

    python benchmarks/store_read.py --steps 12000 --dir DIR
    python benchmarks/store_read.py --store RUN --measure read-compact,diagnose

`diagnose` reads the store as `gradwatch diagnose` does (compact: each metric its recorded rows);
`diagnose-dense` runs the same rules on the dense float64 arrays, as before.

The store is `report_size.py`'s synthetic run (gradient norms every step for 200 Linear layers,
the sampled metrics every 10 steps, 20 sigmoid layers) written once into DIR and reused.

`--live`: the live check's reading over a whole run instead. The run is written again flush by
flush (50 steps each), and at every check the live schedule makes (each time the run has grown by
a tenth, at least 50 steps) the store is read both ways, in turn: whole, as it used to be, and by
one `StoreFollower` that reads only the steps flushed since its last read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from report_size import synthetic_run, write_store

PROBE = """
import json, re, sys, time
import numpy as np
from gradwatch.diagnose import diagnose
from gradwatch.store import read_run
t0 = time.perf_counter()
if sys.argv[1] == "read":
    read_run(sys.argv[2])
elif sys.argv[1] == "read-compact":  # what diagnose and report read: each metric its recorded rows
    read_run(sys.argv[2], compact=True)
elif sys.argv[1] == "diagnose":  # as `gradwatch diagnose`: the store read compact
    diagnose(sys.argv[2])
elif sys.argv[1] == "diagnose-dense":  # the rules on the dense float64 arrays, as before
    diagnose(read_run(sys.argv[2]))
elif sys.argv[1] == "show":  # what `gradwatch show` reads: every metric's first/last/min/max, streamed
    from gradwatch.store.schema import LAYER_COLUMNS
    from gradwatch.store.summary import summarise
    summarise(sys.argv[2], LAYER_COLUMNS)
seconds = time.perf_counter() - t0
hwm = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"peak_mb": hwm / 1024, "seconds": seconds}))
"""


def measure(what: str, store: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, what, str(store)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def live(steps: int, layers: int, directory: Path) -> None:
    from gradwatch.store import FlushBatch, RunStoreWriter
    from gradwatch.store.reader import StoreFollower, _read
    from gradwatch.store.schema import LAYER_COLUMNS

    run = synthetic_run(steps, layers)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "live.sqlite"
    writer = RunStoreWriter(path)
    follower = StoreFollower(writer.connection)
    names = [l.name for l in run.layers]
    columns = np.stack([run.metrics[c] for c in LAYER_COLUMNS], axis=-1)
    whole = followed = 0.0
    checks, last = 0, 0
    for start in range(0, steps, 50):
        batch = FlushBatch(layers=run.layers)
        for r in range(start, min(start + 50, steps)):
            batch.steps.append((r, float(run.loss[r]), 0.1, "[]", 0.0))
            for c in np.flatnonzero(~np.isnan(columns[r]).all(axis=1)):
                batch.layer_rows.append((r, names[c], *[None if np.isnan(v) else float(v) for v in columns[r, c]]))
        writer.write(batch)
        step = start + 50
        if step - last < max(50, step // 10):
            continue
        last, checks = step, checks + 1
        t0 = time.perf_counter()
        _read(writer.connection)
        t1 = time.perf_counter()
        follower.read()
        t2 = time.perf_counter()
        whole, followed = whole + t1 - t0, followed + t2 - t1
    writer.close()
    path.unlink()
    print(f"live check over {steps:,} steps x {layers + 20} layers, {checks} checks: reading the whole store "
          f"{whole:.1f} s, only the new steps {followed:.1f} s ({whole / followed:.1f}x less)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12_000)
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--dir", help="where the synthetic store is written (kept, reused)")
    parser.add_argument("--live", action="store_true", help="the live check's reading over a whole run")
    parser.add_argument("--measure", default="read,read-compact,show,diagnose",
                        help="comma-separated, each in a fresh process: read, read-compact, show, diagnose, "
                             "diagnose-dense")
    parser.add_argument("--store", help="measure this store instead of the synthetic one")
    args = parser.parse_args()
    if not args.dir and not args.store:
        parser.error("give --dir (the synthetic store is written there) or --store RUN")
    if args.live:
        live(args.steps, args.layers, Path(args.dir))
        return 0
    store = Path(args.store) if args.store else Path(args.dir) / f"{args.steps}x{args.layers}"
    if not (store / "gradwatch.sqlite").exists():
        t0 = time.perf_counter()
        write_store(synthetic_run(args.steps, args.layers), store)
        print(f"wrote {store / 'gradwatch.sqlite'} in {time.perf_counter() - t0:.0f} s")
    size = (store / "gradwatch.sqlite").stat().st_size / 1e6
    base = measure("none", store)
    for what in args.measure.split(","):
        m = measure(what, store)
        print(f"{store} ({size:.0f} MB store): {what}: "
              f"peak {m['peak_mb'] - base['peak_mb']:.0f} MB above the interpreter's {base['peak_mb']:.0f} MB, "
              f"{m['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
