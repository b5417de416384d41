"""`gradwatch show`'s title counts the run's steps as a reader expects ("1 step", not "1 steps")."""

import time

import pytest

from gradwatch.cli.main import main
from gradwatch.store import FlushBatch, LayerInfo, RunStoreWriter
from gradwatch.store.schema import LAYER_COLUMNS


@pytest.mark.parametrize("n,title", [(1, "1 step"), (2, "2 steps"), (1200, "1,200 steps")])
def test_the_title_counts_steps(n, title, tmp_path, capsys):
    writer = RunStoreWriter(tmp_path / "gradwatch.sqlite")
    rows = [(s, "fc", 1.0, *[None] * (len(LAYER_COLUMNS) - 1)) for s in range(n)]
    writer.write(FlushBatch([LayerInfo("fc", "Linear", 0, "param", 4)],
                            steps=[(s, 1.0, 0.1, "", time.time()) for s in range(n)], layer_rows=rows))
    writer.close()
    assert main(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    words = " ".join(out.split()) + " "  # (a long run path wraps the title over lines)
    assert f": {title} " in words, out[:300]
