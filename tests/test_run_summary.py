"""The lines `gradwatch run` prints when its command ends (cli/summary.py), on stores written here."""

import io
import math
import sys

from gradwatch.cli.summary import print_run_summary
from gradwatch.diagnose import diagnose
from gradwatch.runner import WATCHED_MARK
from gradwatch.store import FlushBatch, LayerInfo, RunStoreWriter, read_run


def _store(path, command, losses):
    """A store of one layer whose gradient is non-finite wherever the loss is."""
    layer = LayerInfo("fc", "Linear", 0, "param", 5)
    writer = RunStoreWriter(path, meta={"command": command})
    steps = [(i, loss, 0.1, "", 0.0) for i, loss in enumerate(losses)]
    rows = [(i, "fc", 1.0, None, None, None, 0, *[None] * 5) if math.isfinite(loss) else
            (i, "fc", float("inf"), None, None, None, 5, *[None] * 5) for i, loss in enumerate(losses)]
    writer.write(FlushBatch([layer], steps=steps, layer_rows=rows))
    writer.close()


def _summary(run_dir, exit_code=0):
    out = io.StringIO()
    print_run_summary(run_dir, out, exit_code)
    return out.getvalue()


def test_every_process_that_trained_is_said_not_only_the_first(tmp_path):
    """`gradwatch run -- ./train.sh` running pretrain.py then finetune.py: the summary said only the
    first one's steps; the second's store (gradwatch-pid{PID}.sqlite) went unmentioned, and
    `gradwatch diagnose RUN` reads only the first."""
    _store(tmp_path / "gradwatch.sqlite", ["pretrain.py"], [1.0, 0.9, 0.8])
    other = tmp_path / "gradwatch-pid4242.sqlite"
    _store(other, ["finetune.py", "--lr", "0.1"], [2.0, *[math.inf] * 4])
    text = _summary(tmp_path)
    assert f"gradwatch: 3 steps, 1 layer, last loss 0.8 (pretrain.py) -> {tmp_path}" in text
    line = next(l for l in text.splitlines() if "another process" in l)
    kinds = sorted({f.kind for f in diagnose(read_run(other))})
    assert kinds  # (a loss gone infinite: something to say)
    assert line == (f"gradwatch: another process (finetune.py --lr 0.1): 5 steps, 1 layer, last loss non-finite, "
                    f"findings: {', '.join(kinds)}; gradwatch diagnose {other}")


def test_one_process_keeps_its_one_line(tmp_path):
    _store(tmp_path / "gradwatch.sqlite", ["train.py"], [1.0, 0.5])
    text = _summary(tmp_path)
    assert text.splitlines()[0] == f"gradwatch: 2 steps, 1 layer, last loss 0.5 -> {tmp_path}"
    assert "another process" not in text


def test_a_command_that_failed_before_training_says_its_exit_code(tmp_path):
    """`gradwatch run -- python nope.py` (exit 2): "no training step was seen" read as if the script
    had run and trained nothing."""
    assert "ended with exit code 2 before importing torch; nothing recorded" in _summary(tmp_path, 2)
    (tmp_path / WATCHED_MARK).touch()  # a process was watched (start_from_env)
    assert "ended with exit code 2 before any training step was seen" in _summary(tmp_path, 2)
    assert "no training step was seen, nothing recorded" in _summary(tmp_path, 0)
    # a tester's SIGTERM before training began: "exit code 143", the signal unnamed
    assert "was stopped by SIGTERM before any training step was seen" in _summary(tmp_path, 143)


def test_a_later_diagnose_of_a_command_that_failed_says_how_it_ended(tmp_path):
    """A script with a syntax error: a later `gradwatch diagnose runs/latest` guessed "trained no
    torch model ..., or killed before its first store write"."""
    import pytest

    from gradwatch.errors import StoreError
    from gradwatch.store.reader import LOCK_FILE

    (tmp_path / LOCK_FILE).touch()  # (a `gradwatch run` directory)
    said = _summary(tmp_path, 1)
    with pytest.raises(StoreError) as raised:
        read_run(tmp_path)
    assert str(raised.value) in said and "ended with exit code 1 before importing torch" in str(raised.value)


def test_a_python_that_skips_the_start_up_hook_is_said_not_watched(tmp_path):
    """`gradwatch run -- python -I train.py` trained 40 steps unwatched (-I ignores PYTHONPATH, which
    loads the hook), and the summary said "no training step was seen", as of a script that trains
    nothing. (The subprocess is the point: the hook loads, or not, at the interpreter's start.)"""
    from gradwatch import runner

    for flags, out in ([], tmp_path / "hooked"), (["-I"], tmp_path / "isolated"):
        out.mkdir()
        assert runner.run([sys.executable, *flags, "-c", "import torch"], out, {}).exit_code == 0
    assert (tmp_path / "hooked" / WATCHED_MARK).exists()
    assert "no training step was seen" in _summary(tmp_path / "hooked")
    assert not (tmp_path / "isolated" / WATCHED_MARK).exists()
    assert "no process of the command imported torch with gradwatch's start-up hook loaded" in _summary(tmp_path / "isolated")
    runner.prepare_run_dir(tmp_path / "hooked")  # a new run there: the last one's mark is not its own
    assert not (tmp_path / "hooked" / WATCHED_MARK).exists()
