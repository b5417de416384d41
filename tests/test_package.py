"""The package's public names load lazily: the names are right, and the CLI's light paths stay light."""

import importlib
import subprocess
import sys

import gradwatch as gw


def test_public_names_are_the_functions_not_the_subpackages_of_the_same_name():
    for sub in ("gradwatch.fix.inject", "gradwatch.diagnose.finding", "gradwatch.probe.core"):
        importlib.import_module(sub)  # importing a subpackage sets the package's attribute to it
    assert gw.fix is importlib.import_module("gradwatch.fix").fix
    assert gw.diagnose is importlib.import_module("gradwatch.diagnose").diagnose
    assert gw.probe is importlib.import_module("gradwatch.probe").probe
    assert all(callable(getattr(gw, name)) for name in gw.__all__ if name not in ("clip", "modify"))
    assert gw.clip is importlib.import_module("gradwatch.remedies.clip")  # modules: gw.clip.attach(...)
    assert gw.modify is importlib.import_module("gradwatch.remedies.modify")
    assert set(gw.__all__) <= set(dir(gw))


def test_unknown_attribute_is_an_attribute_error():
    try:
        gw.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("no AttributeError")


def test_help_and_the_run_command_parse_without_importing_torch():
    """`gradwatch run`'s work is in the child process: its parent need not wait 2 s for torch;
    nor need `gradwatch --help`, nor the parsers of the commands that read a run."""
    code = ("import sys; from gradwatch.cli.main import build_parser; build_parser(); "
            "[build_parser(c) for c in ('run', 'lab', 'diagnose', 'fix', 'show', 'export')]; "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_every_listed_command_has_its_parser_with_its_options():
    from gradwatch.cli.main import COMMANDS, build_parser

    listed = build_parser()._subparsers._group_actions[0]
    assert [a.dest for a in listed._choices_actions] == list(COMMANDS)
    for name in COMMANDS:
        own = build_parser(name)._subparsers._group_actions[0].choices[name]
        assert own.description and any(a.option_strings == ["-h", "--help"] for a in own._actions), name
