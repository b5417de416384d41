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
