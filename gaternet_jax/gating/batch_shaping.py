"""Batch-shaping and L0 gate regularisers, and their weight schedules (Bejnordi, Blankevoort &
Welling, "Batch-Shaping for Learning Conditional Channel Gated Networks", ICLR 2020).

Batch-shaping. For one gate (one feature), take its continuous values X = (x_1, ..., x_N) over a
batch of N examples and sort them ascending into X*. With F the CDF of a chosen prior, here
Beta(a, b), the paper's loss (a Cramér-von Mises-type distance between the prior and the batch's
empirical CDF, evaluated at the sample points) is

    L_BaS(X) = sum_{i=1}^{N} ( F(X*_i; a, b) - i / (N + 1) )^2

with i / (N + 1) the expected value of F at the i-th order statistic when X really follows the
prior. Its gradient, through the sort (a permutation), is

    d L_BaS / d X*_i = 2 f(X*_i; a, b) ( F(X*_i; a, b) - i / (N + 1) ),   f = F' (the prior's pdf),

which is what autodiff produces here: `jnp.sort`'s derivative routes each sorted position's
gradient back to the example it came from, and `betainc`'s derivative in x is the Beta pdf.

Normalisation. Over the batch we divide by N, as the authors' reference implementation does
(Qualcomm-AI-research/batchshaping, `gbas_loss`: a sum over i divided by N per sub-array), so the
loss and gamma do not depend on the batch size. Over the gates, `gbas_loss` takes a mean, but that
repository holds the loss function only, no model and no recipe; the recipe's gamma = 0.75 comes
from a CIFAR-10 training script whose total loss is `loss_cls + sum over the gating modules of
(per module: the squared residuals summed over the batch and the channels, divided by N)`, i.e.
gamma times the SUM over every gate of the network of the per-gate value here. With a mean that
gamma is C times weaker (C = 336 gates for ResNet-20, 2,016 for ResNet-110): too weak to shape
anything. So the objective (losses.py) takes `gating.batch_shaping_reduction = 'sum'` by default:
gamma means what the recipe's 0.75 meant. 'mean' is `gbas_loss`'s reduction, what runs before
2026-12-05 trained with (legacy.LEGACY_VALUES). The paper's own equation could not be read here
(its stored copies stop at the introduction); the same script exempts the gating modules from
weight decay and leaves their last bias at the framework's default (mean 0): the defaults of
`gating.module_weight_decay` (False) and `gating.module_init_bias` (0.0).

Which values are shaped: the noise-free on-probabilities sigmoid(alpha) of the gates
(`gumbel.gate_on_probability`), one column per gate and one row per example, before any noise or
binarisation. That is the quantity whose distribution *over examples* the loss must make
U-shaped: a gate whose sigmoid(alpha) is near 0 for some images and near 1 for others is
conditional. The relaxed noisy sample sigmoid((alpha + L) / tau) would be the wrong input, since
at tau = 2/3 it is already U-shaped for a constant alpha, so matching a U-shaped prior with it
would not force the gate to depend on the image. (The public reimplementations listed below also
apply the loss to sigmoid(alpha); the paper's own wording could not be checked here.)

Data parallelism: write the loss on the GLOBAL (N, C) array. Inside `jax.jit` with the batch
sharded over the mesh's `data` axis, `jnp.sort` along axis 0 is a global sort (GSPMD inserts the
communication), so the loss and its gradient equal the single-device values; a per-shard loss
would be a different, weaker regulariser (tests/test_batch_shaping.py checks both facts).

L0. The gate of example n, channel c is on with probability sigmoid(alpha_nc), so the expected
fraction of channels computed is

    L_0 = 1 / (N C) sum_{n, c} sigmoid(alpha_nc),

a differentiable surrogate of the L0 norm of the gates (mean over examples and gates, so that,
like the batch-shaping term, its weight does not depend on the batch size or the network's width).

The paper's recipe (the constants below). PROVENANCE: the paper's full text could not be read in
this workspace (its stored copies stop at the abstract), so the values come from public
reimplementations of the paper, read for facts only:
  - Beta(0.6, 0.4) prior: two unrelated batch-shaping implementations both hard-code or default
    to a = 0.6, b = 0.4;
  - gamma_BaS = 0.75, the 500-epoch CIFAR-10 schedule with lr drops at 300/375/450: a CIFAR-10
    "BAS training" script and an independent ResNet-20 notebook that says it follows the paper;
  - BaS decaying linearly to 0 by epoch 100, L0 from epoch 100 ramping linearly to epoch 300:
    that training script only (a third code base has the same decay-then-stop shape, with
    configurable epochs);
  - Gumbel temperature 2/3 and a 16-unit hidden layer in the gating module: the training script's
    gate module and the notebook.
The authors' reference code (Qualcomm-AI-research/batchshaping) has the loss only, no recipe.
The section numbers cited below (Sec. 3 method, Sec. 4 experiments) are likewise unverified.
Check every value against arXiv:1907.06627 before quoting it in a paper table; the ImageNet
recipe (prior, weights, epochs) is not known here at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import betainc

from gaternet_jax.gating.gumbel import gate_on_probability

# ---- The paper's hyper-parameters (CIFAR-10 recipe; UNVERIFIED, see PROVENANCE above). ----
# The prior of the batch-shaping loss, Beta(a, b) (paper Sec. 3, batch-shaping; Sec. 4): U-shaped
# because a, b < 1, with mean a / (a + b) = 0.6, i.e. each gate should be on for ~60% of the
# images and be near-deterministic for each image.
BETA_PRIOR_A = 0.6
BETA_PRIOR_B = 0.4
# gamma of the batch-shaping term at the start of training (paper Sec. 4, training details).
BATCH_SHAPING_WEIGHT = 0.75
# The batch-shaping weight decays linearly from BATCH_SHAPING_WEIGHT to 0 over the first 100
# epochs of the 500-epoch CIFAR-10 schedule (SGD, Nesterov momentum 0.9, lr 0.1 divided by 10 at
# epochs 300, 375 and 450, batch 256, weight decay 5e-4).
BATCH_SHAPING_END_EPOCH = 100
CIFAR10_EPOCHS = 500
# The L0 term is off during a warm-up (so the gates first learn to be conditional, before any
# pressure to switch them off), starts at epoch 100 and its weight grows linearly to its final
# value at epoch 300. The final L0 weight is the knob that trades accuracy for computation: the
# paper sweeps it to draw its accuracy-vs-MAC curves, so there is no single default.
L0_START_EPOCH = 100
L0_RAMP_END_EPOCH = 300
# The gating module of each gated residual block (paper Sec. 3, gating module):
# global average pool -> FC(GATE_HIDDEN_UNITS) -> BatchNorm -> ReLU -> FC(channels) = logits alpha.
GATE_HIDDEN_UNITS = 16

# Inputs are clipped into [CDF_EPS, 1 - CDF_EPS] before the prior's CDF; see `beta_cdf`.
CDF_EPS = 1e-6


def _compute_dtype(x: jax.Array) -> jnp.dtype:
  """float32 for float32/bfloat16/float16 inputs (accurate CDF and sort), float64 for float64."""
  return jnp.promote_types(x.dtype, jnp.float32)


def beta_cdf(x: jax.Array, a: float, b: float, eps: float = CDF_EPS) -> jax.Array:
  """F(x; a, b) = I_x(a, b), the regularised incomplete beta function, at x clipped to [eps, 1-eps].

  Why the clip: d F / d x is the Beta pdf x^(a-1) (1-x)^(b-1) / B(a, b), which is infinite at
  x = 0 when a < 1 and at x = 1 when b < 1 -- both ends for the paper's Beta(0.6, 0.4). A gate
  whose sigmoid saturates to exactly 0.0 or 1.0 (float32 does for |alpha| >~ 17) would then send
  inf or NaN (inf * 0) into the gradient. Clipping bounds the pdf the gradient sees by its value
  at eps and 1 - eps (76 and 1196 for Beta(0.6, 0.4) with eps = 1e-6), and gives a clipped value
  zero gradient -- harmless, since sigmoid'(alpha) is below eps there anyway. The CDF itself moves
  by at most F(eps) ~ 1e-4, far below the loss's resolution. eps = 1e-6 keeps 1 - eps
  representable in float32. a and b are constants (no gradient flows to the prior's parameters).
  """
  x = jnp.clip(x, eps, 1.0 - eps)
  return betainc(jnp.asarray(a, x.dtype), jnp.asarray(b, x.dtype), x)


def batch_shaping_per_gate(
  values: jax.Array, a: float = BETA_PRIOR_A, b: float = BETA_PRIOR_B
) -> jax.Array:
  """(1/N) sum_i (F(X*_i; a, b) - i/(N+1))^2 for each gate (column) of `values`.

  Args:
    values: (N, C) continuous gate values in [0, 1] (examples x gates), the global batch.
    a, b: the Beta prior's parameters.

  Returns:
    (C,) per-gate losses, in float32 (float64 for float64 input).
  """
  if values.ndim != 2:
    raise ValueError(f'batch-shaping needs (examples, gates) values, got shape {values.shape}')
  values = values.astype(_compute_dtype(values))
  n = values.shape[0]
  # Sort each gate's column over the batch: X* (a permutation, so differentiable).
  ordered = jnp.sort(values, axis=0)
  # i / (N + 1), i = 1..N: the prior's CDF at the i-th order statistic has this mean.
  expected = jnp.arange(1, n + 1, dtype=values.dtype) / (n + 1)
  residual = beta_cdf(ordered, a, b) - expected[:, None]
  return jnp.mean(jnp.square(residual), axis=0)


def batch_shaping_loss(
  values: jax.Array, a: float = BETA_PRIOR_A, b: float = BETA_PRIOR_B
) -> jax.Array:
  """The batch-shaping loss averaged over gates: (1/C) sum_c (1/N) sum_i (F(X*_ic) - i/(N+1))^2
  (`gbas_loss`'s reduction; the objective sums the per-gate values instead by default, see the
  module docstring).

  Args:
    values: (N, C) continuous gate values in [0, 1], one row per example of the GLOBAL batch and
      one column per gate: the on-probabilities sigmoid(alpha) (`gumbel.gate_on_probability`),
      before noise and binarisation. Under `jax.jit` the rows may be sharded over devices.
    a, b: the Beta prior's parameters (default: the paper's Beta(0.6, 0.4)).

  Returns:
    A scalar, in float32 (float64 for float64 input). Multiply by N to get the paper's
    un-normalised sum over i for one gate.
  """
  return jnp.mean(batch_shaping_per_gate(values, a, b))


def l0_loss(logits: jax.Array) -> jax.Array:
  """L_0 = mean over examples and gates of P(gate on) = sigmoid(alpha), a scalar in float32.

  Its gradient in alpha_nc is sigmoid(alpha_nc) (1 - sigmoid(alpha_nc)) / (N C).
  """
  return jnp.mean(gate_on_probability(logits))


def batch_shaping_weight(
  step: jax.Array | int, *, end_step: int, initial_weight: float = BATCH_SHAPING_WEIGHT
) -> jax.Array:
  """gamma_BaS(t) = initial_weight * max(0, 1 - t / end_step): linear decay to 0 at end_step.

  `step` may be traced (inside jit / scan); `end_step` is a Python int (the paper's: epoch
  BATCH_SHAPING_END_EPOCH times the steps per epoch). Returns a float32 scalar.
  """
  if end_step <= 0:
    raise ValueError(f'end_step must be positive, got {end_step}')
  step = jnp.asarray(step, jnp.float32)
  return initial_weight * jnp.clip(1.0 - step / end_step, 0.0, 1.0)


def l0_weight(
  step: jax.Array | int, *, final_weight: float, start_step: int, ramp_end_step: int
) -> jax.Array:
  """gamma_L0(t): 0 before start_step, linear up to final_weight at ramp_end_step, then constant.

  ramp_end_step == start_step gives a step function (the full weight from start_step on).
  `step` may be traced; the boundaries are Python ints (the paper's: epochs L0_START_EPOCH and
  L0_RAMP_END_EPOCH times the steps per epoch). Returns a float32 scalar.
  """
  if start_step < 0 or ramp_end_step < start_step:
    raise ValueError(
      f'need 0 <= start_step <= ramp_end_step, got start_step={start_step}, '
      f'ramp_end_step={ramp_end_step}'
    )
  step = jnp.asarray(step, jnp.float32)
  if ramp_end_step == start_step:
    fraction = (step >= start_step).astype(jnp.float32)
  else:
    fraction = jnp.clip((step - start_step) / (ramp_end_step - start_step), 0.0, 1.0)
  return final_weight * fraction
