"""Every threshold the rules use, in one place, with the reason for its value.

The values are set from theory and from what healthy training looks like, not fitted to a
benchmark. `diagnose(run, thresholds=Thresholds(...))` overrides any of them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

from gradwatch.errors import ConfigError


@dataclass(frozen=True)
class Thresholds:
    """The numbers diagnose's rules decide by, each with its reason beside it; override any:
    `gw.diagnose(run, thresholds=gw.Thresholds(vanishing_ratio=1e-3))`."""

    # --- persistence --------------------------------------------------------------------------
    # A sampled-statistic condition must hold on this many consecutive samples (sample_every
    # steps apart, 10 by default) before it is a finding, and still hold at the end of the run
    # or for at least a quarter of the run's samples: a net that soon recovers by itself (an LSTM
    # opening its forget gates, dead units that come back) is not a finding; one stuck for a
    # quarter of its run (a 30-layer Xavier-ReLU net on its plateau) is.
    persist_samples: int = 3
    # Steps at the start whose gradient norms never enter the baseline: gradients often start far
    # from their working level (outputs near 0 at init, warm-up schedules).
    warmup_steps: int = 5

    # --- vanishing / exploding across depth ---------------------------------------------------
    # The backward signal: RMS of ∂L/∂s (the gradient w.r.t. each layer's output), lowest hidden
    # layer over the best-served hidden layer. Glorot & Bengio (2010) show it shrinks toward the
    # input while weight gradients can look level. The RMS per entry also shifts with width and
    # pooling (average pooling divides it by 4 per 2x2 stage; up to ~30-60x in a healthy CNN), so
    # alone it must fall below 1e-3; below 1e-2 it is enough when the relative gradient
    # ‖∂L/∂W‖/‖W‖ (under SGD, the ratio of the layers' learning speeds) collapses below 1e-2 too.
    # Healthy nets (He-init ReLU, BatchNorm, residual) stay within ~10x; sigmoid loses ≥ 4x/layer.
    vanishing_ratio: float = 1e-2
    backward_vanishing_ratio: float = 1e-3
    backward_exploding_ratio: float = 1e3
    # The forward mirror at the first step: the activations' std growing at least this much per
    # activation layer (geometric mean over >= 3 of them, `forward_exploding_ratio` in all) up to
    # at least `forward_exploding_std`: weights initialised without the fan-in scale (N(0, 1): a
    # conv's 3x3x16 inputs each add their variance, x12 per layer). Initialised for their activation
    # (Glorot, He, LeCun) the std stays within ~2x per layer; a SELU CNN at N(0, 1) went 1.27 ->
    # 10.7 -> 216 under Adam, its loss 3251 at the start, and nothing was said (Adam's step hides it).
    forward_layer_growth: float = 10.0
    forward_exploding_ratio: float = 100.0
    forward_exploding_std: float = 10.0
    # A vanishing gradient is an error, not a warning, when the ratio's median from the finding's
    # first step on is below this: a decade under `backward_vanishing_ratio`, the bar ∂L/∂s must
    # pass alone, so no width or pooling explains it.
    vanishing_error_ratio: float = 1e-4
    # Fewer layers than this carry no depth profile worth judging...
    min_profile_layers: int = 3
    # ... unless two hidden layers' ∂L/∂s differ by more than one layer between them can explain:
    # width and pooling move the RMS by up to ~30-60x, a sigmoid by 4x, so six decades take many
    # layers the profile does not see: one block applied again and again (shared weights, a
    # recurrent-style loop in forward()). A sigmoid block applied 10 times between two Linear
    # layers left the lower one 4e-8 of the upper's, and the run on its plateau was told to raise
    # the learning rate. Three decades beyond `backward_vanishing_ratio`.
    short_profile_ratio: float = 1e-6

    # --- exploding over steps ------------------------------------------------------------------
    # Total gradient norm against the median of the previous `baseline_window` steps: `spike_factor`
    # times above it on `spike_steps` steps within one window (sustained growth: a geometric
    # blow-up stays 10x above the median of the 20 steps before it from 25%/step on, since
    # 1.25^10.5 ≈ 10, long before overflow; slower growth shows as updates overshooting the weights
    # under SGD or the weights growing 10x; or recurring bursts), or `jump_factor` times at once
    # and `spike_factor` times anything in the last 5 windows.
    # Either must also rise above the gradient's early range (the median of its first 5 windows,
    # known by then, times the 99.9th percentile of its noise below): after convergence the
    # baseline is tiny, and a cross-entropy's heavy-tailed gradient returning to where it started
    # is not an explosion.
    # A spike must also stand out from the gradient's own noise: beyond its 99.9th percentile
    # (z = 3.09) if the norms are log-normal with the spread the run shows in its calm windows.
    # Minibatch gradients (sigma ~0.2) keep the bar at spike_factor; per-sample gradients at batch
    # size 1 are heavy-tailed (sigma ~1.5 raises it to ~100x).
    baseline_window: int = 20
    spike_factor: float = 10.0
    noise_z: float = 3.09
    spike_steps: int = 3
    jump_factor: float = 1e3
    # The spans, in baseline windows, of "the last 5 windows" a jump must rise above and of "its
    # first 5 windows" that set the gradient's early range (and the level the advice clips at):
    # 100 steps each at the default window.
    jump_history_windows: int = 5
    early_windows: int = 5
    # A burst the run recovers from (back near its level within a window, nothing non-finite
    # after) is an isolated instability, not a finding; one that does not recover is, and so are
    # `chronic_bursts` of them. The finding starts at the first burst: the first warning sign.
    # "Near its level": some norm of the window after the burst below `recovered_factor` times the
    # baseline median where the burst began.
    chronic_bursts: int = 3
    recovered_factor: float = 2.0
    # Bursts (of the gradient norm, or jumps of the loss) at a fixed period are the script's own
    # schedule, not an instability: a DQN's target network copied every N steps re-sets the loss
    # it fits (Adam at 1e-3 on a chain task: the norm 100-200x its converged level every 100 steps,
    # a decade back down before the next, Q-values right; told to clip and that it diverged).
    # Fixed period: `periodic_events` or more, every gap within `period_tolerance` of a whole
    # number of periods (the median gap: a sync that changed little leaves no burst), at least
    # `periodic_events` - 1 of them one period. 5 events at random (exponential gaps) pass that
    # 0.03% of the time, gaps spread uniformly over ±50% of their mean 1.6% (simulated, 200k draws).
    periodic_events: int = 5
    # ... and not a schedule when the peaks grow: the later half's median peak this many times the
    # earlier half's (a DQN's syncs, measured: 1.0x, single peaks 1-3x the first; warm restarts
    # at an lr too high: 2.7x, the loss at the restarts 3.9 -> 15.3).
    schedule_peak_growth: float = 2.0
    period_tolerance: float = 0.1
    # A gradient norm that grows while the loss falls to this share of its level at the burst or
    # below (nothing else exploding, nothing non-finite) is learning that sped up, `info`: an
    # 11-layer sigmoid PINN stuck at a norm of 3e-6 for 600 steps broke out to ~20 (0.45 early on)
    # as its loss fell 49 -> 19, and was told it exploded. A blow-up makes the loss worse.
    burst_learning: float = 0.5
    # One update larger than the weights it changes (‖Δw‖/‖w‖ > 1): the step overshoots.
    # Healthy updates are around 1e-3 (Karpathy's rule of thumb); 1 is three decades above.
    # Measured at sampled steps; under plain SGD, where Δw = lr·g, at every step.
    max_update_ratio: float = 1.0
    # Total weight norm growing this much over the run, rising at every one of the last
    # `persist_samples` samples: weights growing without bound.
    weight_growth: float = 10.0
    # ... and not slowing down: the log-growth of the second half at least this share of the
    # first's (1 for a geometric blow-up; sqrt(t) growth from a small init gives ~0.1-0.2).
    weight_growth_pace: float = 0.5
    # Weights shrunk to this share of their first sampled norm or less (1 / 10: the decade
    # `weight_growth` uses the other way): training from a sound init grows its weights or keeps
    # their scale; a tenfold shrink is weight decay (or an L2 term) outweighing the gradient, the
    # weights settling where λ‖w‖ ≈ ‖g‖. Each layer's backward gain falls with its norm, so the
    # gradient vanishes below it, and an update ratio against a norm near 0 says nothing about the
    # step (SGD, weight_decay=1 on digits: norm 9.0 -> 0.05, update ratio 2.4 at step 50 was called
    # an exploding gradient, and the vanishing below it was told to re-initialise).
    weight_shrink: float = 0.1
    # Clipping by norm at c makes the step lr·c·g/‖g‖ whenever ‖g‖ > c. On the rare spike that is a
    # safety net (a limit at twice the typical norm, as the advice sets it, clips a few % of
    # steps); on nearly every step (this share of them) it is the update rule itself, a fixed step
    # length, and with the gradient's norm at least 1 / `clip_kept` times c (the median step keeps
    # a tenth of lr·g or less: the lr is a decade or more off the step it sets) the clipping hides
    # a gradient on the wrong scale. Under an adaptive optimizer it hides nothing: Adam divides a
    # common factor out of its step.
    clip_active_share: float = 0.9
    clip_kept: float = 0.1
    # The spread (std) of the activations after BatchNorm layers at their initial weights, at the
    # first step, below which they did not normalise (eval mode): standardised, the ReLU / GELU /
    # tanh after them spread 0.58-0.63 (rules/eval_mode.py); a sixth of that is no batch's noise.
    batchnorm_output_std: float = 0.1

    # --- through time (recurrent layers) ---------------------------------------------------------
    # ‖∂L/∂x_t‖ at the start of the sequence over its end: the BPTT horizon of Pascanu et al. (2013)
    # falls short of the sequence when the gradient drops below 1e-3 of its final value (the same
    # cut-off the probe uses), or blows past 1e3.
    time_vanishing_ratio: float = 1e-3
    time_exploding_ratio: float = 1e3
    min_time_steps: int = 8
    # ... said as info, not a warning, when the loss fell to this share of its start or below, and
    # went on falling after the run's first quarter (by a fifth: a mean learnt early stays there): the
    # task was learnt without the sequence's start (a tester's GRU classifier whose label sits in
    # the last 5 of 100 tokens: 100% accuracy, loss 0.45 -> 0.0005, gradient at the first token
    # 1e-16 of the last's; another's LSTM, its label in the last 5 of 60 steps: 0.69 -> 0.10, 95.7%,
    # where the advised forget-gate bias moved its test loss 0.1302 -> 0.1295). Runs whose task
    # needs the start stay near where they began: a vanilla RNN on the adding problem 0.26 -> 0.16
    # (the mean's loss, 62%), the benchmark's first-token RNNs and LSTM 97-99%.
    time_learnt_loss: float = 0.25
    # The first activations' std at the first step from which the inputs' scale is a cause of an
    # exploding gradient or dead units: a layer initialised for its fan-in passes its inputs on at
    # about their own scale, 1 for standardised ones (a tester's tabular MLP with numeric columns in
    # the thousands: std 567; standardised, its MAE halved and no finding was left).
    input_scale_std: float = 100.0

    # --- units ---------------------------------------------------------------------------------
    # Fraction of a layer's units zero for every sample of the batch. A healthy ReLU net keeps
    # most units alive (a few to ~30% dead is common); half dead is lost capacity.
    dead_fraction: float = 0.5
    dead_fraction_error: float = 0.9
    # ... but units that die during training (not at the first step, under 90%) while the loss
    # still falls to this share of its level at the onset or below are capacity lost, not a block
    # (info, not a warning): a RealNVP on 2-D moons (each coupling net sees one coordinate) had
    # 50-59% of its second ReLU layers dead from step 40, NLL 1.62 there -> 0.48; with Leaky ReLU it reached
    # 0.50 and 0.44 where ReLU reached 0.47 and 0.45 (2 seeds). A DQN on 10 one-hot states alike
    # (66% dead, loss falling 1e4x after). Units dying of a learning rate too high leave the loss flat,
    # or halved and stalled far above where it could go (Adam 0.05: 73% dead, 0.31 where 1e-3 reaches
    # 0.024): where the lr is a named cause, info only while the loss still falls at the end.
    dead_learning: float = 0.5
    # ... and the step size is taken for the killer under SGD where a weight layer's sampled update
    # reached this share of its weights in the window before they died. 35 healthy SGD runs on
    # digits (lr 0.01-0.2, with and without momentum) peaked at 0.028-0.10 over the whole run, most
    # of it early; runs whose lr killed their units at 0.13-1.5.
    dying_update_ratio: float = 0.1
    # Adam's first update is lr·sign(g) per weight (m/√v = g/|g| at t = 1), a relative step of
    # lr·√n/‖w‖ = lr / rms(w) where every weight gets a gradient (to 3 digits on 45 recorded runs). When its median
    # over the weight layers is this or more, every step rewrites half a layer's scale, and a
    # loss that then does not halve (`dead_learning`) stalls on steps too long: a tiny GPT at AdamW
    # lr 0.1 (median 1.4, loss 3.54 -> 3.11, 1.04 at lr 1e-3), a GRU seq2seq at Adam 0.05 (0.69,
    # 2.09 -> 1.68; 0.14 at 3e-3). Healthy adaptive runs measured 3e-4 to 0.18 (a post-LN
    # transformer at lr 0.02); a small init under Adam reads high too, but its loss falls.
    adaptive_first_step: float = 0.5
    # Recorded steps in a row, through the end of the run, in which a layer's gradient is exactly
    # 0: nothing above passes any back (ReLUs dead for every sample, called as F.relu where no
    # module hook sees them; weights above all zero). A zero-initialised output layer or a ReZero
    # gate gives exact zeros for one step only.
    zero_gradient_steps: int = 10
    # Share of a plateau's recorded steps whose gradient is exactly 0 in every layer, from which the
    # loss is flat where the model sits and the learning rate is no cause: exact zeros everywhere
    # are no noise (a healthy run has none once past a zero-initialised output's first step).
    zero_gradient_share: float = 0.9
    # Fraction of sigmoid/tanh outputs within 1% of an asymptote, where the derivative is < 0.01.
    saturated_fraction: float = 0.5
    # Dead units at the first step that then rose by this share of the layer or more: the updates
    # killed the rest, so the learning rate is named before the initialisation (a tester's ReLU MLP
    # at lr 1: 58% dead at step 0, 100% by step 30, was told only its initial weight scale).
    dead_rise: float = 0.25
    # ... but units that saturate during training while the loss keeps falling to this share of
    # its level at the onset or below are confident outputs, not a stall (info, not a warning): a
    # tester's tanh classifier saturated 65% of its top hidden layer at step 20, and its loss still
    # fell 0.10 -> 0.022 from then on (99% accuracy). Saturation that blocks learning leaves the loss flat or
    # rising (a tanh MLP at lr 8: 400 -> 590); halving it is learning no block allows.
    saturation_learning: float = 0.5

    # --- updates ---------------------------------------------------------------------------------
    # Update ratio of the lowest layer over the highest of those above it.
    stalled_ratio: float = 1e-2
    # Updates are compared per unit of learning rate where param groups give layers different ones
    # (discriminative fine-tuning moves a backbone less on purpose), but only down to this share of
    # the largest lr. Fine-tuning schemes stay well above it: ULMFiT divides by 2.6 a layer (Howard &
    # Ruder 2018: 3e-3 six layers down), BERT's layer-wise decay 0.65-0.95 a layer (Sun et al. 2019),
    # a detection backbone 0.1x. A group below it barely moves (lr 1e-6 beside 0.05 under SGD: 2.6e-7
    # of its weights a step, 1e-4 over 300 steps) and is judged as it moves: a config for a
    # pretrained backbone applied to a fresh one, or a freeze requires_grad_(False) should say.
    discriminative_lr_floor: float = 1e-3
    # An update ratio at or below this is no update at all (float32 rounding of w + Δw).
    frozen_update: float = 1e-10
    # ... but only when the gradient should have moved them: lr * |g| / |w| at least this. Below
    # it the step itself is lost to float32 rounding (eps 1.2e-7 of |w| per element) — a starved
    # layer (vanishing), not one left out of the optimizer.
    frozen_expected: float = 1e-8
    # ... and not when the loss fell to this fraction of its level where they froze, or lower:
    # weights that never change cannot lower it, so they change between the sampled steps (micro-
    # batches of an accumulation watched without the optimizer: the samples fall between updates).
    # 10% is beyond a window median's noise (the plateau rule calls < 1% flat).
    stalled_loss_fell: float = 0.9

    # --- loss ------------------------------------------------------------------------------------
    # Windows of the loss are compared by their medians (robust to mini-batch noise); a window is
    # a tenth of the run, at least `min_loss_window` steps.
    min_loss_window: int = 5
    min_loss_steps: int = 30
    # The loss at the end within 1% of where it started (and not more than 10% above it, which is
    # getting worse, not flat): no learning.
    plateau_improvement: float = 0.01
    plateau_worsening: float = 0.1
    # A loss back where it started, whose running median fell at least this far below its start
    # (10x the plateau's 1%) in between, learned and then lost it: an lr overshooting once it rose
    # (a OneCycleLR at max_lr 0.6: 2.30 -> 1.69 -> 2.31), not one too small to move the loss.
    rose_back_fall: float = 0.1
    # ... unless the weights barely move (median ‖Δw‖/‖w‖ per step below this: ≤ 1% in 1000 steps,
    # where healthy training moves 1e-3..1e-2 per step) and the rise is within the noise of the
    # start (its interquartile range): then the loss cannot have changed but by its batches.
    plateau_still_update: float = 1e-5
    # A non-negative loss whose plateau lies at or below this is at its floor: converged, not stuck.
    # The loss alone cannot tell the two apart, but where it starts says how far there was to go:
    # cross-entropy knowing nothing is log(classes) >= 0.69 and a standardised regression ~1 (the
    # convention the loss-scale cause reads too), so 0.01 is >= 98.6% of the way to 0 (the right
    # class at >= 99% on average). A converged digits MLP fine-tuned at lr 1e-5 under SGD went
    # 0.0013 -> 0.0015 and was told to raise its lr; the stuck runs measured sat at 0.16-2.4.
    plateau_floor: float = 1e-2
    # ... and a plateau since the learning rate fell to this share of its peak or below, for the last
    # quarter of the run or more, while the loss had not yet halved: the schedule stopped learning
    # (a StepLR meant per epoch stepped per batch: lr 0.05 -> 5e-5 by step 100 of 400, loss 2.30 ->
    # 2.12 and flat from there, at 43% accuracy, with no finding). Under SGD an update is lr·g: at
    # 1e-3 of the peak, a thousand steps move the weights as one did. Schedules sized to the run
    # spend their last 2% at most below it (cosine, OneCycle) and a linear decay its last 0.1%.
    plateau_lr_off: float = 1e-3
    # The loss rising this many times its initial magnitude above it: training made it worse.
    divergence_factor: float = 2.0
    # ... and the window's losses ranking above the start's beyond chance (one-sided Mann-Whitney
    # z; 3.1 is p ≈ 0.001, the running median being tested at ~10 places per window): with single-
    # sample losses the ratio of two medians of 20 is noise (simulated flat χ²₁ runs of 200 steps:
    # 32.6% flagged on the factor alone, 2.0% with this; batch-size-8 means: 0% either way;
    # benchmarks/divergence_noise.py).
    divergence_rank_z: float = 3.1
    # ... with at least this many losses ranked, from the window's first on (a window of fewer can
    # never reach that z: 5 against 5 ranks at most z = 2.6): a short run's rise is tested on the
    # losses after its window too (20 against 5 reach 3.4). Runs of 200 steps or more, windows of
    # 20, are tested as before.
    divergence_rank_losses: int = 20
    # A GradScaler skipping this many iterations in a row at the end of the run: halved at each, its
    # scale is then 1e-6 of what it was and the values still overflow, so the forward itself does
    # (non_finite). Its start-up backoff from 65536 skips a few (9 in a tester's run).
    scaler_stuck_skips: int = 20
    # ... or the running median this many times the larger of the first two losses (before updates
    # compound): a blow-up within the first window raises that window's median with it. Two
    # decades: both first batches 100x below the loss's typical value has probability ~0.3% even
    # for batch-size-1 squared errors (χ²₁: P(x < median/100) ≈ 0.054).
    early_divergence_factor: float = 100.0

    def __post_init__(self) -> None:
        """Every threshold is a positive number (a count of steps or samples a whole one; warm-up may
        be 0): a negative ratio or a NaN would silently switch a rule off, or on, for every run."""
        for f in fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy's too
            least = 0 if f.name == "warmup_steps" else 1
            if f.type == "int":
                ok, want = isinstance(value, numbers.Integral) and number and value >= least, f"a whole number >= {least}"
            else:
                ok, want = number and math.isfinite(value) and value > 0, "a finite number > 0"
            if not ok:
                raise ConfigError(f"Thresholds({f.name}={value!r}): expected {want} (default {f.default})")


DEFAULT = Thresholds()
