"""Each test runs in a directory of its own and leaves no watch attached."""

import contextlib

import pytest

from gradwatch.collect import patches


@pytest.fixture(autouse=True)
def _in_a_directory_of_its_own(tmp_path, monkeypatch):
    """A fix run in the checkout's root put the checkout back after each trial: a copy of the sources
    taken aside, and the file `make test > test.log` writes taken for a trial's and put back."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _no_watch_left_attached():
    """One left attached (as scripts leave theirs) watches every later backward of the same pytest
    worker, so a later test that counts kernels counted its too."""
    before = list(patches._listeners)
    yield
    for listener in [l for l in patches._listeners if l not in before]:
        with contextlib.suppress(Exception):
            (getattr(listener, "detach", None) or listener.remove)()  # a Watch, or fix's Injector


# The files whose tests take longest, measured (`pytest --durations=60`: 113, 93, 66, 44, 40 and 35 s
# of a worker's time), collected first: `--dist loadfile` hands out files in collection order, and
# one of them started last, alone, left the other worker idle for as long (2 cores: 517 s, of which
# each worker was busy about 473).
SLOW_FIRST = ("test_lab.py", "test_fix_pause.py", "test_distributed.py", "test_cli_run.py", "test_fix.py",
              "test_fix_scripts.py")


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # (stable: each file's order kept)
