"""Remedies: clipping, a non-finite step guard, per-layer initialisation, and model changes.

Depends on gradwatch's errors and three torch-only helpers of `gradwatch.collect` (the activation
names, the gradient-hook patches, the norms); gw.fix builds on these, not the reverse.
"""

from gradwatch.remedies import clip, modify
from gradwatch.remedies.guard import Guard, guard
from gradwatch.remedies.init import InitReport, check_constant_init, init_
from gradwatch.remedies.modify import Change, add_residual, insert_norm, replace_rnn, swap_activations, swap_functions

__all__ = ["clip", "guard", "Guard", "init_", "InitReport", "check_constant_init", "modify",
           "swap_activations", "swap_functions", "insert_norm", "add_residual", "replace_rnn", "Change"]
