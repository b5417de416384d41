"""Failures of `gradwatch probe` that no --input-shape fixes say what does: CUDA code on a CPU
machine, BatchNorm in train mode on batch size 1, a model file that does not compile or imports
a missing package. They used to end in "pass the --input-shape the model expects" or "set
PYTHONPATH"."""

import sys

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.cli.main import main
from gradwatch.probe.inputs import check_fits, random_batch

MODELS = '''
import torch
from torch import nn

class ToCuda(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x.cuda())

def on_cuda():
    return nn.Linear(4, 2).cuda()

def bn():
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
'''

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")


def probe_cli(tmp_path, monkeypatch, capsys, name: str, source: str, factory: str, shape: str) -> str:
    """Exit code 2 and the one error line of `gradwatch probe NAME.py:FACTORY` on `source`."""
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    assert main(["probe", f"{name}.py:{factory}", "--input-shape", shape, "--iters", "0"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


@needs_no_cuda
def test_cuda_in_the_forward_is_named_not_the_shape(tmp_path, monkeypatch, capsys):
    line = probe_cli(tmp_path, monkeypatch, capsys, "cudafwd", MODELS, "ToCuda", "2,4")
    assert "(at cudafwd.py:11)" in line and "torch.cuda.is_available() is False" in line
    assert "--input-shape" not in line and "does not fit" not in line, line


@needs_no_cuda
def test_cuda_in_the_factory_and_at_import(tmp_path, monkeypatch, capsys):
    line = probe_cli(tmp_path, monkeypatch, capsys, "cudafac", MODELS, "on_cuda", "2,4")
    assert "raised AssertionError" in line and "(at cudafac.py:14)" in line and "in place of .cuda()" in line
    line = probe_cli(tmp_path, monkeypatch, capsys, "cudaimp", "import torch\nW = torch.zeros(2).cuda()\n"
                     "def f():\n    return torch.nn.Linear(2, 2)\n", "f", "2,2")
    assert "cannot import 'cudaimp'" in line and "(at cudaimp.py:2)" in line and "in place of .cuda()" in line
    assert "PYTHONPATH" not in line, line


def test_batchnorm_at_batch_size_1_is_told_the_batch_size(tmp_path, monkeypatch, capsys):
    line = probe_cli(tmp_path, monkeypatch, capsys, "bnone", MODELS, "bn", "1,8")
    assert "in layer '1' (BatchNorm1d)" in line and line.endswith("--input-shape 2,8"), line
    # the advice works
    assert main(["probe", "bnone.py:bn", "--input-shape", "2,8", "--iters", "0", "--json"]) == 0


def test_batchnorm_at_batch_size_1_from_python():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    with pytest.raises(gw.ConfigError, match=r"in layer '1' \(BatchNorm1d\); BatchNorm in train mode .* model.eval\(\)"):
        gw.probe(model, torch.randn(1, 8))
    gw.probe(model.eval(), torch.randn(1, 8), iters=0)  # the advice works


def test_a_syntax_error_is_not_told_to_set_pythonpath(tmp_path, monkeypatch, capsys):
    line = probe_cli(tmp_path, monkeypatch, capsys, "broken_syntax", "import torch\ndef f(:\n    pass\n", "f", "2,3")
    assert "SyntaxError" in line and "broken_syntax.py, line 2" in line and "does not compile" in line
    assert "PYTHONPATH" not in line, line


def test_a_missing_dependency_is_named(tmp_path, monkeypatch, capsys):
    line = probe_cli(tmp_path, monkeypatch, capsys, "needs_dep", "import torch\nimport gw_no_such_dependency\n"
                     "def f():\n    return torch.nn.Linear(2, 2)\n", "f", "2,2")
    assert "(at needs_dep.py:2)" in line and "it imports 'gw_no_such_dependency'" in line
    assert "PYTHONPATH" not in line, line


def test_a_module_not_found_keeps_the_path_advice(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["probe", "gw_no_such_pkg.models:make", "--input-shape", "2,3"]) == 2
    line = capsys.readouterr().err.strip()
    assert "set PYTHONPATH" in line and "(at " not in line, line  # no frame of importlib's own code


RECURRENT = '''
from torch import nn

class TimeFirst(nn.Module):
    def __init__(self, batch_first=False):
        super().__init__()
        self.rnn = nn.LSTM(3, 8, batch_first=batch_first)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.out(y[-1] if not self.rnn.batch_first else y[:, -1])

def batch_first():
    return TimeFirst(True)
'''


@pytest.mark.parametrize("factory,note,steps", [
    ("TimeFirst", "'rnn' (LSTM, batch_first=False) reads --input-shape 4,6,3 as 4 time steps of a batch of 6", 4),
    ("batch_first", "'rnn' (LSTM, batch_first=True) reads --input-shape 4,6,3 as 6 time steps of a batch of 4", 6),
])
def test_a_recurrent_first_layer_says_how_it_reads_the_shape(factory, note, steps, tmp_path, monkeypatch, capsys):
    """"batch size first" is wrong for batch_first=False: 4,6,3 meant as 4 sequences of 6 steps was probed
    as 4 steps, "horizon beyond the sequence", with nothing to tell the two apart."""
    (tmp_path / "timefirst.py").write_text(RECURRENT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "timefirst", raising=False)
    assert main(["probe", f"timefirst.py:{factory}", "--input-shape", "4,6,3", "--iters", "0"]) == 0
    out = capsys.readouterr()
    assert note in out.err
    result = gw.probe(nn.LSTM(3, 8), torch.randn(steps, 2, 3), iters=0)  # the same length from Python
    assert len(result.recurrent[0].profile) == steps + 1
    assert f"BPTT horizon beyond the sequence of {steps} steps" in out.out


def test_a_vocab_beyond_the_embedding_says_so(tmp_path, monkeypatch, capsys):
    """It said "pass the --input-shape the model expects": no shape helps, --vocab is what is wrong."""
    source = "from torch import nn\ndef lm():\n    return nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 3))\n"
    (tmp_path / "lmvocab.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["probe", "lmvocab.py:lm", "--input-shape", "4,12", "--vocab", "1000", "--iters", "0"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "takes [0, 100): pass --vocab 100 or less" in line and "--input-shape the model expects" not in line
    assert main(["probe", "lmvocab.py:lm", "--input-shape", "4,12", "--vocab", "100", "--iters", "0"]) == 0


def test_a_package_of_the_project_not_on_the_path_is_told_pythonpath(tmp_path, monkeypatch, capsys):
    """A src layout not installed: src/mypkg/net.py imports mypkg. It was called a missing dependency
    ("install it"); the advice that works is PYTHONPATH=src."""
    pkg = tmp_path / "src" / "gwsrcpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layers.py").write_text("from torch import nn\nBlock = nn.Linear\n")
    (pkg / "net.py").write_text("from gwsrcpkg.layers import Block\ndef make():\n    return Block(4, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("net", "gwsrcpkg", "gwsrcpkg.layers"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert main(["probe", "src/gwsrcpkg/net.py:make", "--input-shape", "2,4", "--iters", "0"]) == 2
    line = capsys.readouterr().err.strip()
    assert "set PYTHONPATH=src" in line and "install it" not in line, line
    sys.path.insert(0, str(tmp_path / "src"))  # the advice works
    monkeypatch.delitem(sys.modules, "net", raising=False)
    assert main(["probe", "src/gwsrcpkg/net.py:make", "--input-shape", "2,4", "--iters", "0", "--json"]) == 0


@needs_no_cuda
def test_a_gpu_checkpoint_is_told_map_location(tmp_path, monkeypatch, capsys):
    """torch.load of a checkpoint saved on a GPU raises on a CPU machine; the advice was "in place of
    .cuda()", which the user's code does not call."""
    source = ("import torch\ndef make():\n    m = torch.nn.Linear(4, 2)\n"
              "    torch.serialization.default_restore_location(torch.UntypedStorage(8), 'cuda:0')\n    return m\n")
    line = probe_cli(tmp_path, monkeypatch, capsys, "gpuckpt", source, "make", "2,4")
    assert "map_location='cpu'" in line and "in place of .cuda()" not in line, line


class TokenAndPosition(nn.Module):
    def __init__(self, vocab: int = 100, block: int = 8):
        super().__init__()
        self.wte, self.wpe, self.head = nn.Embedding(vocab, 16), nn.Embedding(block, 16), nn.Linear(16, vocab)

    def forward(self, idx):
        return self.head(self.wte(idx) + self.wpe(torch.arange(idx.shape[1])))


def test_a_sequence_beyond_the_position_table_is_a_shape_not_a_vocab():
    """A position Embedding(8) with a sequence of 16 was told "--vocab 8" (the smallest table)."""
    model = TokenAndPosition()
    batch = random_batch(model, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(gw.ConfigError) as err:
        check_fits(model, batch, "gpt.py:make")
    assert "'wpe'" in str(err.value) and "--input-shape 2,8" in str(err.value) and "--vocab" not in str(err.value)
    check_fits(model, random_batch(model, (2, 8)), "gpt.py:make")  # the advice works


def test_a_vocab_beyond_one_of_two_tables_names_that_table():
    model = TokenAndPosition()
    batch = random_batch(model, (2, 4), vocab=200, generator=torch.Generator().manual_seed(0))
    with pytest.raises(gw.ConfigError) as err:
        check_fits(model, batch, "gpt.py:make")
    assert "'wte' (nn.Embedding) takes [0, 100): pass --vocab 100 or less" in str(err.value), str(err.value)
    check_fits(model, random_batch(model, (2, 4), vocab=100), "gpt.py:make")  # the advice works


def test_a_model_file_parsing_its_arguments_at_import_sees_its_own_argv(tmp_path, monkeypatch, capsys):
    """A tester's script with a module-level argparse: `gradwatch probe s14.py:M` printed "gradwatch:
    error: unrecognized arguments: probe ...", the script's parser reading gradwatch's arguments."""
    source = ("import argparse\nfrom torch import nn\np = argparse.ArgumentParser()\np.add_argument('--lr', type=float, "
              "default=0.1)\nargs = p.parse_args()\ndef M():\n    return nn.Linear(4, 2)\n")
    (tmp_path / "argscript.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "argscript", raising=False)
    argv = list(sys.argv)
    assert main(["probe", "argscript.py:M", "--input-shape", "2,4", "--iters", "0", "--json"]) == 0
    assert sys.argv == argv  # given back
    line = probe_cli(tmp_path, monkeypatch, capsys, "exits", "import sys\nsys.exit(3)\n", "M", "2,4")
    assert "importing 'exits' exited (code 3)" in line and "if __name__ == '__main__':" in line
