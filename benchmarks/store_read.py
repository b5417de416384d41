"""Peak memory and time of reading a long run's store (`read_run`) and of diagnosing it, each in
a fresh process (peak RSS: VmHWM, which starts afresh at exec, unlike `ru_maxrss`; the interpreter
with gradwatch imported is measured alone first and subtracted).

    python benchmarks/store_read.py --steps 12000 --dir /tmp/store-read

The store is `report_size.py`'s synthetic run (gradient norms every step for 200 Linear layers,
the sampled metrics every 10 steps, 20 sigmoid layers) written once into DIR and reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from report_size import synthetic_run, write_store

PROBE = """
import json, re, sys, time
import numpy as np
from gradwatch.diagnose import diagnose
from gradwatch.store import read_run
t0 = time.perf_counter()
if sys.argv[1] == "read":
    read_run(sys.argv[2])
elif sys.argv[1] == "diagnose":
    diagnose(read_run(sys.argv[2]))
seconds = time.perf_counter() - t0
hwm = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"peak_mb": hwm / 1024, "seconds": seconds}))
"""


def measure(what: str, store: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, what, str(store)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12_000)
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--dir", required=True, help="where the synthetic store is written (kept, reused)")
    args = parser.parse_args()
    store = Path(args.dir) / f"{args.steps}x{args.layers}"
    if not (store / "gradwatch.sqlite").exists():
        t0 = time.perf_counter()
        write_store(synthetic_run(args.steps, args.layers), store)
        print(f"wrote {store / 'gradwatch.sqlite'} in {time.perf_counter() - t0:.0f} s")
    size = (store / "gradwatch.sqlite").stat().st_size / 1e6
    base = measure("none", store)
    for what in ("read", "diagnose"):
        m = measure(what, store)
        print(f"{args.steps:,} steps x {args.layers + 20} layers ({size:.0f} MB store): {what}: "
              f"peak {m['peak_mb'] - base['peak_mb']:.0f} MB above the interpreter's {base['peak_mb']:.0f} MB, "
              f"{m['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
