"""How a run ended, in the words the tools say after "partial run: " (`show`, `diagnose`, `report`,
`export`): from the meta `gradwatch run` and the callbacks record (docs/store.md)."""

from __future__ import annotations

import signal

from gradwatch.store.schema import CLOSED_KEY, EXIT_KEY
from gradwatch.store.series import RunSeries

_SIGNALS = {int(s): s.name for s in signal.Signals}


def signal_name(exit_code: int) -> str | None:
    """'SIGTERM' for a shell's exit code 143 (128 + the signal), 'Ctrl-C (SIGINT)' for 130; else None."""
    name = _SIGNALS.get(exit_code - 128) if exit_code > 128 else None
    return "Ctrl-C (SIGINT)" if name == "SIGINT" else name


def end_note(meta: dict, last_step: int | None = None) -> str | None:
    """What makes a run partial, as the tools say it after "partial run: " (still being written;
    its command ended by an error, an exit code or a signal, or `gradwatch run` itself was killed),
    or None for a run that ended normally or whose end is not known (a store written by `gw.watch`
    or a callback in the user's own process)."""
    at = f" at step {last_step}" if last_step is not None else ""
    if meta.get("live"):
        return "still being written" + (f": stored up to step {last_step} so far" if at else "")
    end = meta.get(EXIT_KEY)
    if end is None and meta.get(CLOSED_KEY):  # (`gradwatch run` killed alone: its command ran on and closed it)
        return None
    if end is None and meta.get("command") and not meta.get("framework"):
        # a `gradwatch run` store (a callback's names its framework): `gradwatch run` records the end
        # once its command ends, unless it was killed first, with it (its process group, the machine)
        return ("its end was never recorded: `gradwatch run` was killed with its command (SIGKILL, or the "
                "machine stopped)" + (f" after step {last_step}; the steps after its last store write are lost" if at else ""))
    if not isinstance(end, dict) or not end.get("code"):
        return None
    if end.get("error"):
        return f"the training stopped on an error{at} ({end['error']}); every step until then is stored"
    code = int(end["code"])
    name = signal_name(code)
    if name in ("SIGTERM", "Ctrl-C (SIGINT)"):  # handled: the process stores its last steps before it ends
        return f"stopped by {name}{at}; every step until then is stored"
    if name:  # SIGKILL, SIGHUP (a closed terminal), SIGSEGV...: the steps since the last store write are gone
        return f"killed by {name}{' (out of memory?)' if name == 'SIGKILL' else ''}" + (
            f" after step {last_step}: the steps after its last store write are lost" if at else "")
    return f"the command ended with exit code {code}{at}; every step until then is stored"


def partial_note(run: RunSeries) -> str | None:
    """`end_note` of a series read with `read_run`: its meta and its last step."""
    return end_note(run.meta, int(run.steps[-1]) if len(run.steps) else None)
