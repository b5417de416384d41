"""Hooks put on the user's modules that a pickle of the module leaves inert. `torch.save(model)`
pickles a module with its hooks: a watch's are closures, and a script that saved its whole model
after a step whose next one was sampled (its hooks armed) crashed ("Can't pickle local object").
A deep copy (an EMA or teacher copy) gets no live hook either, so its forwards are not read as the
watched layers'."""

from __future__ import annotations

import functools
import sys
from typing import Callable

# What a watch hook becomes in a pickled or copied module: a standard-library call that takes any
# arguments and returns None (a hook's None changes no output), so a model saved whole under a
# watch loads where gradwatch is not installed. It raises an audit event no one listens to.
INERT = functools.partial(sys.audit, "gradwatch.inert_hook")


class Unsaved:
    """`hook`, called as it is; pickled (and deep-copied), `INERT`."""

    __slots__ = ("hook",)

    def __init__(self, hook: Callable) -> None:
        self.hook = hook

    def __call__(self, *args, **kwargs):
        return self.hook(*args, **kwargs)

    def __reduce__(self):
        return INERT.__reduce__()
