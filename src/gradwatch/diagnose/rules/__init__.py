"""The rules: one function per problem, `find_<problem>(run, thresholds) -> list[Finding]`."""

from gradwatch.diagnose.rules.dead_units import find_dead_units
from gradwatch.diagnose.rules.exploding import find_exploding
from gradwatch.diagnose.rules.late_clipping import find_late_clipping
from gradwatch.diagnose.rules.loss import find_loss_divergence, find_loss_plateau
from gradwatch.diagnose.rules.loss_broadcast import find_loss_broadcast
from gradwatch.diagnose.rules.non_finite import find_non_finite
from gradwatch.diagnose.rules.repeated_backward import find_repeated_backward
from gradwatch.diagnose.rules.saturation import find_saturation
from gradwatch.diagnose.rules.stale_gradients import find_stale_gradients
from gradwatch.diagnose.rules.stalled import find_stalled
from gradwatch.diagnose.rules.through_time import find_through_time
from gradwatch.diagnose.rules.vanishing import find_vanishing

RULES = (find_stale_gradients, find_late_clipping, find_repeated_backward, find_loss_broadcast, find_non_finite, find_exploding, find_vanishing, find_through_time, find_dead_units,
         find_saturation, find_stalled, find_loss_divergence, find_loss_plateau)

__all__ = ["RULES"]
