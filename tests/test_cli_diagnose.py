"""gradwatch diagnose, and the findings `gradwatch run` leaves behind."""

import json
import re

from gradwatch.diagnose import diagnose
from test_cli_run import SCRIPTS, gradwatch, gradwatch_here


def test_run_writes_findings_and_diagnose_prints_them(tmp_path):
    run = tmp_path / "r"
    result = gradwatch("run", "--out", run, SCRIPTS / "train_sigmoid.py")
    assert result.returncode == 0, result.stderr
    written = json.loads((run / "findings.json").read_text())
    assert [f["kind"] for f in written] == [f.kind for f in diagnose(run)]
    assert "vanishing_gradient" in {f["kind"] for f in written}
    assert "vanishing_gradient" in result.stderr  # said at the end of the run

    as_json = gradwatch("diagnose", run, "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == written
    text = gradwatch("diagnose", run)
    assert "vanishing_gradient since step 0" in text.stdout and "fix:" in text.stdout
    # piped (80 columns), the code to paste is printed whole: each remedy's lines as they are, with
    # the script's name for its optimizer (`opt`; its model is `model`: the JSON stays generic)
    renamed = 0
    for remedy in (r for f in written for r in f["remedies"]):
        for line in remedy["code"].splitlines():
            own = re.sub(r"(?<![\w.])optimizer(?!\w)", "opt", line)
            renamed += own != line
            assert "       " + own in text.stdout.splitlines(), line
    assert renamed and "optimizer" not in "".join(l for l in text.stdout.splitlines() if l.startswith("       "))
    # ... and each finding's sentence is one line, as grep finds it (rich wrapped it at 80 columns)
    for f in written:
        assert "  " + f["message"] in text.stdout.splitlines()


def test_diagnose_missing_run_is_one_clear_line(tmp_path):
    result = gradwatch_here("diagnose", tmp_path / "nope")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("gradwatch: error: no run at") and "Traceback" not in result.stderr


def test_diagnose_corrupt_store_is_one_clear_line(tmp_path):
    (tmp_path / "gradwatch.sqlite").write_bytes(b"this is not a database" * 100)
    result = gradwatch_here("diagnose", tmp_path)
    assert result.returncode == 2
    assert "is not a gradwatch store" in result.stderr and "Traceback" not in result.stderr


def test_diagnose_empty_directory(tmp_path):
    result = gradwatch_here("diagnose", tmp_path)
    assert result.returncode == 2 and "holds no gradwatch store" in result.stderr


def test_evidence_values_inside_dicts_are_short():
    """A value per layer printed every float to 17 digits, and all 200 layers of a deep net."""
    from gradwatch.cli.diagnose_cmd import _fmt

    per_layer = {str(i): 2.8561567333440507e-08 * (i + 1) for i in range(20)}
    text = _fmt(per_layer)
    assert text.startswith("{0: 2.86e-08, 1: 5.71e-08,") and text.endswith(", ... 12 more}")
    assert text.count(":") == 8 and "2.8561567" not in text
    assert _fmt([0.123456, 7]) == "[0.123, 7]" and _fmt(0.000123456) == "0.000123" and _fmt("conv") == "conv"
