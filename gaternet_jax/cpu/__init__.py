"""Everything that exists only for XLA:CPU speed, behind one seam.

Users train on GPUs and TPUs; the CPU path matters for development, CI and the offline default.
On the 2-core development CPU these made ResNet-20 training several times faster
(docs/performance.md), and none of them changes what a model computes beyond float32 rounding:

- `native/`: C++ convolution kernels registered as XLA FFI targets, compiled on first use
  (no C++ compiler: one warning, and XLA's own convolutions);
- `native_conv.py`: swaps those kernels into every `flax.linen.Conv` while a step is traced;
- `staged_batch_norm.py`: batch norm's sums in two fused stages (training);
- `materialize.py`: convolution inputs stored for the backward pass instead of recomputed;
- `flags.py`: the process's XLA flags and malloc settings, per-program compile options, and the
  GATERNET_* switches that turn each of these off.

The rest of the package reaches them only through `speedups` (while tracing a step) and
`compiler_options` (when compiling one), both called where the steps are built
(`training/steps.py`, `training/dispatch.py`) and by `Run.predict`; `environment.prepare()` sets
the process flags. On any platform but 'cpu' both are no-ops and nothing here is imported.
"""

from __future__ import annotations

import contextlib
from typing import Any


def speedups(
  platform: str, *, training: bool, mesh: Any = None
) -> contextlib.AbstractContextManager:
  """A context to trace a step in: on 'cpu', the native convolutions (over `mesh`'s devices),
  and for a training step also staged batch norm and stored convolution inputs; elsewhere none."""
  if platform != 'cpu':
    return contextlib.nullcontext()
  from gaternet_jax.cpu import materialize, native_conv, staged_batch_norm  # noqa: PLC0415

  stack = contextlib.ExitStack()
  if training:
    stack.enter_context(materialize.conv_inputs_materialized())
    stack.enter_context(staged_batch_norm.batch_norm_staged())
  stack.enter_context(native_conv.native_convolutions(mesh=mesh))
  return stack


def compiler_options(platform: str, program: str) -> dict[str, object]:
  """XLA compile options for `program` ('train' or 'init') on `platform`: CPU-only, else {}."""
  if platform != 'cpu':
    return {}
  from gaternet_jax.cpu import flags  # noqa: PLC0415

  return flags.program_options(program)
