"""How long `gradwatch report` takes and how big the page is for a long, deep run.

    python benchmarks/report_size.py                       # 100k steps x 200 layers, in memory
    python benchmarks/report_size.py --steps 20000 --store /tmp/big   # also via a real store on disk

The run is synthetic (no training): `grad_norm` every step for 200 Linear layers, falling with
depth and with a burst of non-finite steps; the sampled metrics every 10 steps; 20 sigmoid
layers; a loss that falls then blows up. `--store DIR` writes it as a real store first (slow:
~1 s per 1,000 steps) and times `gradwatch report DIR` end to end, reading included.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from gradwatch.store.series import METRICS, LayerInfo, RunSeries


def synthetic_run(n_steps: int = 100_000, n_param: int = 200, n_act: int = 20, sample_every: int = 10,
                  seed: int = 0) -> RunSeries:
    rng = np.random.default_rng(seed)
    layers = [LayerInfo(f"blocks.{i}.linear", "Linear", i, "param", 4096) for i in range(n_param)]
    layers += [LayerInfo(f"acts.{i}", "Sigmoid", n_param + i, "activation", 0, "sigmoid") for i in range(n_act)]
    steps = np.arange(n_steps, dtype=np.int64)
    metrics = {m: np.full((n_steps, len(layers)), np.nan) for m in METRICS}
    depth = np.linspace(-4, 0, n_param)  # log10: the input layers get 10^4 times less gradient
    g = metrics["grad_norm"]
    g[:, :n_param] = 10.0 ** (depth + 0.2 * rng.standard_normal((n_steps, n_param), dtype=np.float32))
    burst = slice(int(n_steps * 0.9), int(n_steps * 0.9) + 50)
    g[burst, :n_param] = np.inf
    sampled = steps % sample_every == 0
    n_s = int(sampled.sum())
    metrics["weight_norm"][sampled, :n_param] = 10.0
    metrics["update_ratio"][sampled, :n_param] = 10.0 ** (-3 + 0.3 * rng.standard_normal((n_s, n_param)))
    metrics["grad_max"][sampled, :n_param] = g[sampled, :n_param] / 10
    metrics["saturated"][sampled, n_param:] = np.clip(np.linspace(0.9, 0.1, n_act) + 0.02 * rng.standard_normal((n_s, n_act)), 0, 1)
    metrics["dead"][sampled, n_param:] = 0.0
    metrics["act_mean"][sampled, n_param:] = 0.5
    metrics["act_std"][sampled, n_param:] = 0.1
    loss = 2.0 * np.exp(-steps / (n_steps / 5)) + 0.1 + 0.05 * rng.random(n_steps)
    loss[burst.start:] = np.inf
    meta = {"command": ["python", "train.py", "--depth", str(n_param)], "torch": "2.13.0", "optimizer": "SGD",
            "every": 1, "sample_every": sample_every, "skipped_steps": []}
    return RunSeries(layers, steps, loss, np.full(n_steps, 0.1), metrics, meta=meta)


def write_store(run: RunSeries, directory: Path) -> Path:
    """The series as a real store file, in flushes of 1,000 steps."""
    from gradwatch.store import FlushBatch, RunStoreWriter
    from gradwatch.store.schema import LAYER_COLUMNS

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "gradwatch.sqlite"
    path.unlink(missing_ok=True)
    writer = RunStoreWriter(path, {k: v for k, v in run.meta.items() if k != "skipped_steps"})
    names = [l.name for l in run.layers]
    columns = np.stack([run.metrics[c] for c in LAYER_COLUMNS], axis=-1)  # steps × layers × columns
    for start in range(0, len(run.steps), 1000):
        batch = FlushBatch(layers=run.layers)
        for r in range(start, min(start + 1000, len(run.steps))):
            s = int(run.steps[r])
            batch.steps.append((s, float(run.loss[r]), float(run.lr[r]), "[]", 0.0))
            block = columns[r]
            for c in np.flatnonzero(~np.isnan(block).all(axis=1)):
                batch.layer_rows.append((s, names[c], *[None if np.isnan(v) else float(v) for v in block[c]]))
        writer.write(batch)
    writer.close()
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--out", default="report-size.html")
    parser.add_argument("--store", help="also write a real store here and time `gradwatch report` on it")
    args = parser.parse_args()
    from gradwatch.diagnose import diagnose
    from gradwatch.report import render_html

    t0 = time.perf_counter()
    run = synthetic_run(args.steps, args.layers)
    t1 = time.perf_counter()
    findings = diagnose(run)
    t2 = time.perf_counter()
    page = render_html(run, findings=findings, title=f"synthetic {args.steps} x {args.layers}")
    t3 = time.perf_counter()
    Path(args.out).write_text(page, encoding="utf-8")
    size = Path(args.out).stat().st_size
    print(f"{args.steps:,} steps x {len(run.layers)} layers ({args.layers} with parameters): built {t1 - t0:.1f} s, "
          f"diagnose {t2 - t1:.1f} s ({len(findings)} findings), render {t3 - t2:.1f} s, "
          f"diagnose+render {t3 - t1:.1f} s, page {size / 1e6:.2f} MB -> {args.out}")
    if args.store:
        from gradwatch.cli.main import main as cli
        from gradwatch.store import read_run

        t4 = time.perf_counter()
        write_store(run, Path(args.store))
        t5 = time.perf_counter()
        read_run(args.store)
        t6 = time.perf_counter()
        cli(["report", args.store, "-o", str(Path(args.store) / "report.html")])
        t7 = time.perf_counter()
        print(f"store: written {t5 - t4:.1f} s; read_run {t6 - t5:.1f} s; `gradwatch report` end to end {t7 - t6:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
