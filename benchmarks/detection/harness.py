"""Shared by measure.py and run.py: find the scenarios, record each under `gradwatch run`, read
back what the script printed (its RESULT line) and what gradwatch stored."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIO_DIR = HERE / "scenarios"
DEFAULT_OUT = HERE / "out"
KINDS = (
    "vanishing_gradient", "exploding_gradient", "non_finite", "dead_units",
    "saturation", "stalled_layers", "loss_plateau", "loss_divergence",
)
FAMILIES = ("mlp", "cnn", "rnn", "gru", "lstm", "transformer")


@dataclass
class Scenario:
    name: str
    path: Path
    family: str
    optimizer: str
    expected: list[str]
    allowed: list[str]
    evidence: str

    @property
    def healthy(self) -> bool:
        return not self.expected and not self.allowed


def read_scenario(path: Path) -> Scenario:
    """The module-level SCENARIO dict, read with ast (the script is not imported)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SCENARIO" for t in node.targets):
            spec = ast.literal_eval(node.value)
            break
    else:
        raise ValueError(f"{path}: no module-level SCENARIO = {{...}}")
    bad = [k for k in spec["expected"] + spec["allowed"] if k not in KINDS]
    if bad or spec["family"] not in FAMILIES or spec["name"] != path.stem:
        raise ValueError(f"{path}: bad SCENARIO (unknown kinds {bad}, family {spec['family']!r} or name)")
    return Scenario(spec["name"], path, spec["family"], spec["optimizer"], list(spec["expected"]),
                    list(spec["allowed"]), spec["evidence"])


def scenarios(only: list[str] | None = None) -> list[Scenario]:
    found = [read_scenario(p) for p in sorted(SCENARIO_DIR.glob("*.py")) if not p.name.startswith("_")]
    if only:
        unknown = set(only) - {s.name for s in found}
        if unknown:
            sys.exit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
        found = [s for s in found if s.name in only]
    return found


def gradwatch_exe() -> str:
    exe = Path(sys.executable).parent / "gradwatch"
    return str(exe) if exe.exists() else "gradwatch"


def record(scenario: Scenario, out: Path) -> dict:
    """Run the scenario under `gradwatch run --out out/<name>` (1 thread); keep its stdout and
    stderr in that directory. Returns exit code and wall time."""
    run_dir = out / scenario.name
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [gradwatch_exe(), "run", "--out", str(run_dir), str(scenario.path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE)
    wall = time.perf_counter() - start
    (run_dir / "stdout.txt").write_text(proc.stdout)
    (run_dir / "stderr.txt").write_text(proc.stderr)
    info = {"exit_code": proc.returncode, "wall_s": round(wall, 2)}
    (run_dir / "bench.json").write_text(json.dumps(info))
    return info


def script_result(run_dir: Path) -> dict:
    """The scenario's own `RESULT {...}` line, or {} if it printed none."""
    path = run_dir / "stdout.txt"
    if not path.exists():
        return {}
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {}


def bench_info(run_dir: Path) -> dict:
    path = run_dir / "bench.json"
    return json.loads(path.read_text()) if path.exists() else {}
