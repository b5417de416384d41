"""A script that re-executes itself (os.execv: the same pid, a new program) under `gradwatch run`."""

import os
import subprocess
import sys

from gradwatch.store import read_run, store_files

STAGES = ("import os, sys, torch\n"
          "stage = sys.argv.count('again')\n"
          "torch.manual_seed(stage)\n"
          "model = torch.nn.Linear(4, 1)\n"
          "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
          "for _ in range(7):\n"
          "    loss = model(torch.randn(8, 4)).pow(2).mean()\n"
          "    opt.zero_grad(); loss.backward(); opt.step()\n"
          "    print(repr(loss.item()), flush=True)\n"
          "if stage < 2:\n"
          "    os.execv(sys.executable, [sys.executable, *sys.argv, 'again'])\n")


def test_each_stage_of_a_script_that_re_executes_itself_twice_is_stored(tmp_path):
    """The second and third stages, the same pid, both took gradwatch-pid{PID}.sqlite: the third
    overwrote the second's 7 steps. Each stage keeps its own store, in the order they ran, and the
    summary names each as the same process after os.execv."""
    script = tmp_path / "train.py"
    script.write_text(STAGES)
    result = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--out", str(tmp_path / "r"), str(script)],
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert result.returncode == 0, result.stderr
    losses = [float(line) for line in result.stdout.split()]
    stores = store_files(tmp_path / "r")
    assert len(losses) == 21 and len(stores) == 3
    assert [list(read_run(store).loss) for store in stores] == [losses[:7], losses[7:14], losses[14:]]
    assert list(read_run(tmp_path / "r").loss) == losses[:7]  # (diagnose reads the first stage's, as before)
    assert result.stderr.count("gradwatch: the same process after os.execv (") == 2, result.stderr
    assert "another process" not in result.stderr


def test_store_files_come_in_the_order_their_processes_made_them(tmp_path):
    """By name, a process's later stage (-pid7-2) sorted before its first (-pid7: '-' < '.'), and
    rank10 before rank2. Numbers count by value, and a name comes before its continuations."""
    names = ["gradwatch-pid7-10.sqlite", "gradwatch-pid7-2.sqlite", "gradwatch-pid7.sqlite", "gradwatch.sqlite",
             "gradwatch-pid12.sqlite", "gradwatch-rank10.sqlite", "gradwatch-rank2.sqlite"]
    for name in names:
        (tmp_path / name).touch()
    assert [f.name for f in store_files(tmp_path)] == [
        "gradwatch.sqlite", "gradwatch-pid7.sqlite", "gradwatch-pid7-2.sqlite", "gradwatch-pid7-10.sqlite",
        "gradwatch-pid12.sqlite", "gradwatch-rank2.sqlite", "gradwatch-rank10.sqlite"]
