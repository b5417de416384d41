"""Each test leaves no watch attached: one left attached (as scripts leave theirs) watches every
later backward of the same pytest worker, so a later test that counts kernels counted its too."""

import contextlib

import pytest

from gradwatch.collect import patches


@pytest.fixture(autouse=True)
def _no_watch_left_attached():
    before = list(patches._listeners)
    yield
    for listener in [l for l in patches._listeners if l not in before]:
        with contextlib.suppress(Exception):
            (getattr(listener, "detach", None) or listener.remove)()  # a Watch, or fix's Injector
