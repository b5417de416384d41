"""`gradwatch probe` end to end, in a subprocess, with factories from tests/test_probe_helpers.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.cli.main import main

TESTS = Path(__file__).resolve().parent


def run(*args, cwd=TESTS):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "gradwatch", "probe", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_json_and_png(tmp_path):
    png = tmp_path / "profile.png"
    p = run("test_probe_helpers:sigmoid_mlp", "--input-shape", "16,32", "--num-classes", "10",
            "--json", "--png", str(png), "--iters", "5")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert [x["name"] for x in d["layers"]] == [str(i) for i in range(0, 17, 2)]
    assert d["verdict"] == "vanishing"
    assert d["findings"][0]["kind"] == "vanishing_gradient" and d["findings"][0]["first_step"] == 0
    assert d["mean_field"]["activation"] == "sigmoid" and d["mean_field"]["chi1"] < 0.1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_and_embedding_input_from_another_directory(tmp_path):
    # run from elsewhere with PYTHONPATH, integer inputs inferred from the Embedding
    env_cwd = tmp_path
    p = subprocess.run([sys.executable, "-m", "gradwatch", "probe", "test_probe_helpers:TinyLM",
                        "--input-shape", "4,12", "--num-classes", "50"], cwd=env_cwd, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS)))
    assert p.returncode == 0, p.stderr
    assert "rnn" in p.stdout and "BPTT horizon" in p.stdout and "verdict" in p.stdout


@pytest.mark.parametrize("args,needle", [
    (["nosuchpkg.models:make", "--input-shape", "2,3"], "cannot import 'nosuchpkg.models'"),
    (["test_probe_helpers:nope", "--input-shape", "2,3"], "has no attribute 'nope'"),
    (["test_probe_helpers", "--input-shape", "2,3"], "not of the form package.module:factory"),
    (["test_probe_helpers:broken", "--input-shape", "2,3"], "raised RuntimeError: cannot build"),
    (["test_probe_helpers:needs_args", "--input-shape", "2,3"], "needs arguments (width) and the CLI calls it with none"),
    (["test_probe_helpers:sigmoid_mlp", "--input-shape", "16,33"], "input shape 16,33 does not fit"),
    (["test_probe_helpers:sigmoid_mlp", "--input-shape", "16,x"], "--input-shape '16,x'"),
    (["test_probe_helpers:no_layers", "--input-shape", "2,3"], "has no layers"),
    (["test_probe_helpers:sigmoid_mlp", "--input-shape", "16,32", "--num-classes", "7"], "--num-classes 7"),
    # these were tracebacks, or silently ignored, and said only after the whole probe was computed
    (["test_probe_helpers:sigmoid_mlp", "--input-shape", "16,32", "--num-classes", "0"], "at least 2 classes"),
    (["test_probe_helpers:sigmoid_mlp", "--input-shape", "16,32", "--png", "out.txt"], "cannot write a .txt figure"),
    (["test_probe_helpers:sigmoid_mlp", "--input-shape", "100000,1000000000"], "does not fit in memory"),
    (["test_probe_helpers:sigmoid_mlp", "--input-shape", "16,32", "--seed", str(2**70)], "--seed 1180591620717411303424"),
    # was a traceback: torch's MultiheadAttention checks the rank of its input with an assert
    (["test_probe_helpers:TinyAttention", "--input-shape", "2,5,3"], "AssertionError: query should be unbatched 2D"),
])
def test_bad_input_is_one_clear_line(args, needle, monkeypatch, capsys):
    monkeypatch.chdir(TESTS)  # in-process (a subprocess per case would cost seconds each)
    assert main(["probe", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradwatch: error: ") and needle in lines[0], lines


def test_bad_input_in_a_subprocess_has_no_traceback():
    p = run("test_probe_helpers:sigmoid_mlp", "--input-shape", "16,33")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("gradwatch: error: input shape 16,33 does not fit") and "Traceback" not in p.stderr


@pytest.mark.parametrize("args,needle", [
    (["test_probe_helpers:LateEmbedding", "--input-shape", "2,5"], "pass --vocab N"),
    (["test_probe_helpers:TwoInputs", "--input-shape", "2,4"], "takes 2 inputs (a, b)"),
    # a dict input said "pass the --input-shape the model expects"; batch.get(...) was a traceback
    (["test_probe_helpers:DictInput", "--input-shape", "2,4"], "(at test_probe_helpers.py:65); its forward reads keys"),
    (["test_probe_helpers:GetInput", "--input-shape", "2,4"], "no attribute 'get' (at test_probe_helpers.py:70)"),
    # "pass the --input-shape the model expects" for a float model given --vocab
    (["test_probe_helpers:sigmoid_mlp", "--input-shape", "4,32", "--vocab", "10"], "drop --vocab"),
])
def test_a_batch_that_cannot_fit_says_why(args, needle, monkeypatch, capsys):
    """The advice was always "--input-shape", which no shape can satisfy here."""
    import warnings

    monkeypatch.chdir(TESTS)
    with warnings.catch_warnings(record=True) as caught:  # torch's own warnings of the failed trial
        warnings.simplefilter("always")  # forward (DictInput: "non-tuple sequence for indexing") were
        assert main(["probe", *args]) == 2  # printed above the one line
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert needle in line and "--input-shape the model expects" not in line, line
    assert not caught, [str(w.message) for w in caught]


def test_a_float64_model_gets_a_float64_batch(monkeypatch, capsys):
    import torch

    from gradwatch.probe.inputs import random_batch
    from test_probe_helpers import double_mlp

    gen = torch.Generator().manual_seed(0)
    batch = random_batch(double_mlp(), (3, 6), generator=gen)
    assert batch.dtype == torch.float64
    torch.testing.assert_close(batch, torch.randn(3, 6, generator=torch.Generator().manual_seed(0)).double())
    monkeypatch.chdir(TESTS)
    assert main(["probe", "test_probe_helpers:double_mlp", "--input-shape", "3,6", "--iters", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"][0]["grad_w_norm"] > 0


def test_cross_entropy_on_nchw_logits_uses_dim_1_as_classes():
    import torch

    from gradwatch.probe.inputs import make_loss

    y = torch.randn(2, 3, 4, 5)
    loss = make_loss("cross_entropy", 3, torch.Generator().manual_seed(0))(y)
    target = torch.randint(0, 3, (2 * 4 * 5,), generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.cross_entropy(y, target.view(2, 4, 5))  # torch: classes on dim 1
    torch.testing.assert_close(loss, expected)
    with pytest.raises(Exception, match="--num-classes 5 does not match"):
        make_loss("cross_entropy", 5)(y)


# -- a newcomer's typos and first tries (in-process: argparse exits with SystemExit(2)) -------------

@pytest.mark.parametrize("argv,usage,needle", [
    (["prob", "m:f"], "usage: gradwatch [-h]", "unknown command 'prob' (did you mean probe?)"),
    (["diag", "runs/x"], "usage: gradwatch [-h]", "(did you mean diagnose?)"),
    (["help"], "usage: gradwatch [-h]", "unknown command 'help' (for help: gradwatch --help, or gradwatch COMMAND"),
    # an unknown option was reported by the top-level parser, whose usage does not show the command's options
    (["lab", "he30", "--quik"], "usage: gradwatch lab", "unrecognized arguments: --quik (did you mean --quick?)"),
    (["probe", "m:f", "--input-shape", "2,3", "--itres", "3"], "usage: gradwatch probe", "(did you mean --iters?)"),
])
def test_typos_name_what_was_meant(argv, usage, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and usage in err and needle in err, err


def test_version(capsys):
    import gradwatch

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"gradwatch {gradwatch.__version__}"


def test_a_script_s_own_options_still_pass_through(tmp_path, monkeypatch):
    """parse_known_args must not take `gradwatch run train.py --lr 0.1`'s options for typos."""
    from gradwatch.cli.main import build_parser, parse

    args = parse(build_parser("run"), ["run", "train.py", "--lr", "-0.1", "--shape", "-1,2", "-x"])
    assert args.target == ["train.py", "--lr", "-0.1", "--shape", "-1,2", "-x"]
    args = parse(build_parser("fix"), ["fix", "--budget-steps", "-1", "--", "python", "t.py", "--shape", "-1,2"])
    assert args.budget_steps == -1 and args.target == ["--", "python", "t.py", "--shape", "-1,2"]


def test_a_negative_shape_reaches_the_shape_check(monkeypatch, capsys):
    """argparse said "argument --input-shape: expected one argument" of `--input-shape -1,32`."""
    monkeypatch.chdir(TESTS)
    assert main(["probe", "test_probe_helpers:sigmoid_mlp", "--input-shape", "-1,32"]) == 2
    assert "--input-shape '-1,32' is not a list of positive integers" in capsys.readouterr().err


def test_factory_as_a_file_path(tmp_path, monkeypatch, capsys):
    """`models.py:make` (a path, what a newcomer types) said: cannot import 'models.py'."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mymodels.py").write_text(
        "from torch import nn\ndef make():\n    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))\n")
    monkeypatch.chdir(tmp_path)
    assert main(["probe", "sub/mymodels.py:make", "--input-shape", "3,4", "--iters", "0", "--json"]) == 0
    assert [x["name"] for x in json.loads(capsys.readouterr().out)["layers"]] == ["0", "2"]
    assert main(["probe", "sub/nofile.py:make", "--input-shape", "3,4"]) == 2
    assert "no such file 'sub/nofile.py'" in capsys.readouterr().err


def test_the_same_command_gives_the_same_numbers(monkeypatch, capsys):
    """The factory initialises from torch's global RNG, which was not seeded: every run differed."""
    monkeypatch.chdir(TESTS)
    outs = []
    for _ in range(2):
        import torch

        torch.manual_seed(len(outs) + 123)  # whatever state the process is in
        assert main(["probe", "test_probe_helpers:sigmoid_mlp", "--input-shape", "4,32", "--iters", "0", "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        outs.append([(x["grad_out_norm"], x["act_std"]) for x in d["layers"]])
    assert outs[0] == outs[1]


def test_a_plot_without_spectra_draws_no_jacobian_lines(tmp_path, monkeypatch):
    """iters=0 measures no singular value: the product line was drawn flat at 1 (missing as 1)."""
    import matplotlib.figure
    import torch

    import gradwatch as gw
    from test_probe_helpers import sigmoid_mlp

    drawn = {}
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (drawn.update(lines=[len(ax.lines) for ax in fig.axes]), save(fig, *a, **k)))
    torch.manual_seed(0)
    model = sigmoid_mlp()
    gw.probe(model, torch.randn(8, 32), iters=0).plot(str(tmp_path / "a.png"))
    assert drawn["lines"][0] == 2 and drawn["lines"][1] == 0
    gw.probe(model, torch.randn(8, 32), iters=3).plot(str(tmp_path / "b.png"))
    assert drawn["lines"][1] == 4  # σmax, mean σ, their product, the line at 1


def test_without_spectra_the_end_to_end_gain_is_said_not_measured_not_nan():
    import torch

    import gradwatch as gw
    from test_probe_helpers import sigmoid_mlp

    torch.manual_seed(0)
    unmeasured = gw.probe(sigmoid_mlp(), torch.randn(8, 32), iters=0).summary_lines()[0]
    assert unmeasured.startswith("end-to-end gain: not measured") and "nan" not in unmeasured
    assert "σmax" in gw.probe(sigmoid_mlp(), torch.randn(8, 32), iters=2).summary_lines()[0]
