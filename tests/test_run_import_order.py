"""`gradwatch run` and `gradwatch fix` trials watch a script that imports a gradwatch module before
torch: the module imports torch, and the watch started at torch's load found gradwatch.collect.watch
half-run (an ImportError: "not watching this process", nothing recorded). It starts once that
gradwatch import ends, and records what it records when the script imports torch first."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradwatch import runner
from gradwatch.fix.candidates import combine, lr_scale, swap
from gradwatch.fix.trial import run_trial
from gradwatch.store import read_run

STEPS, LR, BUDGET = 6, 0.05, 4
TRAINING = f"""
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr={LR})
X = torch.randn(64, 4)
y = X.sum(1, keepdim=True)
for step in range({STEPS}):
    loss = ((model(X) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
print("weights", [float(v).hex() for p in model.parameters() for v in p.detach().flatten()])
"""
FIRST_IMPORTS = ["import gradwatch.fix", "import gradwatch.collect.watch", "from gradwatch.probe import probe"]


def script(folder: Path, first: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.py"
    path.write_text(f"{first}\n{TRAINING}")
    return path


def watched(path: Path, run_dir: Path, status: bool = False) -> subprocess.CompletedProcess:
    """`path` run as `gradwatch run` runs it (its environment: the start-up hook on PYTHONPATH;
    `status`: with --status)."""
    run_dir.mkdir()
    env = dict(runner.child_env(run_dir, {"status": 1} if status else {}), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def torch_first(tmp_path_factory):
    """The same training importing torch first, watched, and its output unwatched."""
    folder = tmp_path_factory.mktemp("torch_first")
    path = script(folder, "import torch")
    result = watched(path, folder / "r")
    assert result.returncode == 0 and "not watching" not in result.stderr, result.stderr
    plain = subprocess.run([sys.executable, str(path)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                           capture_output=True, text=True, timeout=60)
    return read_run(folder / "r"), plain.stdout


def same_records(a, b) -> None:
    assert np.array_equal(a.steps, b.steps) and np.array_equal(a.loss, b.loss) and np.array_equal(a.lr, b.lr)
    assert a.layers == b.layers and sorted(a.metrics) == sorted(b.metrics)
    for name in a.metrics:
        assert np.array_equal(a.metrics[name], b.metrics[name], equal_nan=True), name


@pytest.mark.parametrize("first", FIRST_IMPORTS)
def test_a_script_importing_gradwatch_before_torch_is_watched_as_one_importing_torch_first(tmp_path, torch_first, first):
    reference, unwatched = torch_first
    result = watched(script(tmp_path, first), tmp_path / "r")
    assert result.returncode == 0 and "not watching" not in result.stderr, result.stderr
    run = read_run(tmp_path / "r")
    assert list(run.steps) == list(range(STEPS))
    same_records(run, reference)
    assert result.stdout == unwatched  # the training itself unchanged, bit for bit


def test_a_gradwatch_import_in_a_thread_while_torch_loads_in_the_main_one(tmp_path, torch_first):
    """A thread imports gradwatch.collect.watch while the main thread imports torch: the watch
    started at torch's load (its import had begun before the thread's) met the module half-run in
    the other thread (5 runs in 6 recorded nothing). It starts when the thread's import ends."""
    first = ("import threading\nworker = threading.Thread(target=__import__, args=('gradwatch.collect.watch',))\n"
             "worker.start()\nimport torch\nworker.join()")
    result = watched(script(tmp_path, first), tmp_path / "r")
    assert result.returncode == 0 and "not watching" not in result.stderr, result.stderr
    same_records(read_run(tmp_path / "r"), torch_first[0])


def test_a_fix_trial_applies_its_remedy_to_a_script_importing_gradwatch_fix_first(tmp_path, torch_first):
    """The same start makes a trial's remedy injector: its model change (Tanh -> LeakyReLU) and its
    optimizer change (lr x0.5, recorded as the lr the steps used) are made, and the budget ends it."""
    trial = run_trial([sys.executable, str(script(tmp_path, "import gradwatch.fix"))], tmp_path / "trial",
                      combine(swap("Tanh"), lr_scale(0.5)), BUDGET)
    assert trial.exit_code == 0 and trial.not_applied == "" and trial.steps == BUDGET, trial.output_tail(5)
    run, baseline = read_run(trial.run_dir), torch_first[0]
    assert np.allclose(run.lr, 0.5 * LR) and np.allclose(baseline.lr, LR)
    assert "leaky_relu" in {layer.activation for layer in run.layers} - {layer.activation for layer in baseline.layers}
    assert not np.array_equal(run.loss, baseline.loss[:BUDGET])


@pytest.mark.parametrize("status", [False, True], ids=["plain", "status line"])
def test_only_the_imports_the_watchs_start_needs_delay_it(tmp_path, status):
    """The start-up hook counts the imports of the gradwatch modules `_start` imports, not others:
    one of those run in a thread (the Lightning integration imports lightning for seconds) held the
    watch back while the main thread trained. Every gradwatch module a started watch holds is one
    the hook counts; and the loaders it wrapped are as they were once their module ran."""
    path = tmp_path / "started.py"
    path.write_text("import importlib.util, pickle, sys\nimport torch\nimport gradwatch.fix\n"
                    "print(sorted(m for m in sys.modules if m.split('.')[0] == 'gradwatch'))\n"
                    "spec = importlib.util.find_spec('gradwatch.fix.inject')\n"
                    "print(spec == importlib.util.find_spec('gradwatch.fix.inject'), len(pickle.dumps(spec.loader)) > 0)\n")
    result = watched(path, tmp_path / "r", status=status)
    assert result.returncode == 0, result.stderr
    modules, loaders = result.stdout.strip().splitlines()
    source = ast.parse((Path(runner.__file__).parent / "_bootstrap" / "sitecustomize.py").read_text())
    named = {t.id: ast.literal_eval(node.value) for node in source.body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name) and t.id in ("STARTS", "STARTS_PACKAGES")}
    counted = lambda m: m in named["STARTS"] or ".".join(m.split(".")[:2]) in named["STARTS_PACKAGES"]
    assert all(counted(m) for m in ast.literal_eval(modules)), modules
    assert loaders == "True True"
