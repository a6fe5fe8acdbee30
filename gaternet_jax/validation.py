"""Checks every config field before anything trains, so a bad value fails in a second, not hours.

A value that passes `ml_collections`' type check can still be meaningless (a negative learning
rate, a zero bottleneck): training would run, or crash only after hours of pre-training. The rules
live in one table keyed by the dotted name a user writes in `--config.FIELD=`; a new field is one
line. Fields a config lacks (older code, future fields) are skipped; extra fields are left to
`lock_config`, which already refuses unknown overrides.

Importing this module imports no JAX: the dataset and backbone names are read lazily.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Sequence

from gaternet_jax import configs
from gaternet_jax.errors import UserError

Check = Callable[[Any], 'str | None']  # None for a good value, else 'must be > 0' or the like

_MISSING = object()


def _at_least(low: float) -> Check:
  return lambda v: None if v >= low else f'must be >= {low}'


def _above(low: float) -> Check:
  return lambda v: None if v > low else f'must be > {low}'


def _within(low: float, high: float, *, low_open: bool, high_open: bool) -> Check:
  """A check for an interval; `*_open` excludes that end ('[0, 1)', '(0, 1]')."""
  above = (lambda v: v > low) if low_open else (lambda v: v >= low)
  below = (lambda v: v < high) if high_open else (lambda v: v <= high)
  interval = f'{"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
  return lambda v: None if above(v) and below(v) else f'must be in {interval}'


def _one_of(choices: Callable[[], Sequence[str]]) -> Check:
  """Membership in `choices()`, called only when checked: registries may import JAX."""

  def check(v):
    known = choices()
    return None if v in known else f'must be one of {", ".join(known)}'

  return check


def _backbones() -> list[str]:
  from gaternet_jax import models  # noqa: PLC0415 (imports Flax and JAX)

  return sorted(models.BACKBONES)


def _datasets() -> Sequence[str]:
  from gaternet_jax import data  # noqa: PLC0415 (imports JAX)

  return data.NAMES


def _fractions(v) -> str | None:
  """Step-schedule boundaries: fractions of training, each after the one before."""
  if not all(_is(float, b) and math.isfinite(b) for b in v):
    return 'must be a tuple of numbers'
  if any(not 0 < b < 1 for b in v) or any(a >= b for a, b in zip(v, v[1:])):
    return 'must be strictly increasing values in (0, 1)'
  return None


def _gate_losses(v: str) -> str | None:
  """Distinct names from GATE_LOSSES separated by commas ('' for none)."""
  try:
    configs.parse_gate_losses(v)
  except UserError:
    return configs.GATE_LOSSES_RULE
  return None


def _binarizers() -> Sequence[str]:
  from gaternet_jax.gating import binarizers  # noqa: PLC0415 (imports JAX)

  return binarizers.BINARIZERS


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one field may hold.

  Attributes:
    kind: int, float, str, bool, or tuple (a list is accepted too: JSON has no tuples).
    check: further condition on a value of the right kind; None for any.
    optional: None is allowed (the config documents what None means).
  """

  kind: type
  check: Check | None = None
  optional: bool = False


RULES: dict[str, Rule] = {
  'name': Rule(str),
  'seed': Rule(int, _at_least(0)),
  'model.backbone': Rule(str, _one_of(_backbones)),
  'model.width': Rule(float, _above(0)),
  'model.se_reduction': Rule(int, _at_least(0)),
  'model.gated': Rule(bool),
  'model.strided_padding': Rule(str, _one_of(lambda: configs.STRIDED_PADDINGS)),
  'gater.extractor': Rule(str, _one_of(_backbones)),
  'gater.extractor_width': Rule(float, _above(0)),
  'gater.bottleneck': Rule(int, _at_least(1)),
  'gater.init_bias': Rule(float),
  'gater.dropout_rate': Rule(float, _within(0, 1, low_open=False, high_open=True)),
  'gating.method': Rule(str, _one_of(lambda: configs.GATING_METHODS)),
  'gating.binarizer': Rule(str, _one_of(_binarizers)),
  'gating.losses': Rule(str, _gate_losses),
  'gating.l1_weight': Rule(float, _at_least(0)),
  'gating.temperature': Rule(float, _above(0)),
  'gating.module_hidden': Rule(int, _at_least(1)),
  'gating.module_init_bias': Rule(float),
  'gating.module_weight_decay': Rule(bool),
  'gating.batch_shaping_reduction': Rule(str, _one_of(lambda: configs.BATCH_SHAPING_REDUCTIONS)),
  'gating.batch_shaping_weight': Rule(float, _at_least(0)),
  'gating.batch_shaping_end': Rule(float, _within(0, 1, low_open=True, high_open=False)),
  'gating.prior_a': Rule(float, _above(0)),
  'gating.prior_b': Rule(float, _above(0)),
  'gating.l0_weight': Rule(float, _at_least(0)),
  'gating.l0_start': Rule(float, _within(0, 1, low_open=False, high_open=False)),
  'gating.l0_ramp_end': Rule(float, _within(0, 1, low_open=False, high_open=False)),
  'data.name': Rule(str, _one_of(_datasets)),
  'data.data_dir': Rule(str, optional=True),
  'data.eval_split': Rule(str),
  'data.holdout': Rule(int, _at_least(0)),
  'data.holdout_seed': Rule(int, _at_least(0)),  # numpy refuses negative seeds
  'data.image_size': Rule(int, _at_least(1)),
  'data.shuffle_buffer': Rule(int, _at_least(1)),
  'data.crop_padding': Rule(int, _at_least(0)),
  'data.augment': Rule(bool),
  'batch_size': Rule(int, _at_least(1)),
  'eval_batch_size': Rule(int, _at_least(1)),
  'optimizer.momentum': Rule(float, _within(0, 1, low_open=False, high_open=True)),
  'optimizer.nesterov': Rule(bool),
  'optimizer.weight_decay': Rule(float, _at_least(0)),
  'optimizer.learning_rate': Rule(float, _above(0)),
  'optimizer.base_batch_size': Rule(int, _at_least(1)),
  'schedule.name': Rule(str, _one_of(lambda: ('step', 'cosine', 'constant'))),
  'schedule.num_epochs': Rule(float, _above(0)),
  'schedule.warmup_epochs': Rule(float, _at_least(0)),
  'schedule.boundaries': Rule(tuple, _fractions),
  'schedule.decay_factor': Rule(float, _within(0, 1, low_open=True, high_open=False)),
  'max_steps': Rule(int, _at_least(1), optional=True),
  'procedure.pretrain': Rule(bool),
  'procedure.pretrain_epochs': Rule(float, _above(0), optional=True),
  'procedure.joint_extra_epochs': Rule(float, _at_least(0)),
  'procedure.joint_learning_rate': Rule(float, _above(0), optional=True),
  'init.backbone': Rule(str, optional=True),
  'init.gater': Rule(str, optional=True),
  'half_precision': Rule(bool),
  'log_every_steps': Rule(int, _at_least(1)),
  'steps_per_dispatch': Rule(int, _at_least(1), optional=True),
  'eval_every_epochs': Rule(float, _above(0)),
  'checkpoint_every_steps': Rule(int, _at_least(1)),
  'checkpoint_min_interval_s': Rule(float, _at_least(0), optional=True),
  'keep_checkpoints': Rule(int, _at_least(1)),
}

# (field, other, strict): field must be < other (strict) or <= other. A warm-up as long as
# training never reaches the peak; L0's ramp cannot end before it starts (equal: a step).
LESS_THAN: tuple[tuple[str, str, bool], ...] = (
  ('schedule.warmup_epochs', 'schedule.num_epochs', True),
  ('gating.l0_start', 'gating.l0_ramp_end', False),
)

_KIND_NAMES = {int: 'an int', float: 'a number', str: 'a string', bool: 'a bool', tuple: 'a tuple'}


def _is(kind: type, value: Any) -> bool:
  """Whether `value` is of `kind`; a bool is no number here (`True` is no batch size)."""
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if kind is float:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  if kind is tuple:
    return isinstance(value, (tuple, list))
  return isinstance(value, kind)


def _lookup(config: Any, field: str) -> Any:
  """`config[a][b]` for field 'a.b', or _MISSING where the config has no such field."""
  node = config
  for part in field.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, IndexError, AttributeError):
      return _MISSING
  return node


def _problem(field: str, rule: Rule, value: Any) -> str | None:
  """What is wrong with `value` for `field` (one line), or None."""
  if value is None and rule.optional:
    return None
  if not _is(rule.kind, value):
    what = _KIND_NAMES.get(rule.kind, rule.kind.__name__)
    none = ' or None' if rule.optional else ''
    kind = '' if value is None else f' ({type(value).__name__})'
    return f'config field {field} must be {what}{none}, got {value!r}{kind}'
  if rule.kind is float and not math.isfinite(value):
    return f'config field {field} must be finite, got {value!r}'
  message = rule.check(value) if rule.check else None
  return f'config field {field} {message}, got {value!r}' if message else None


def validate_config(config: Any) -> None:
  """Checks every field of `config` that `RULES` knows; fields the config lacks are skipped.

  Args:
    config: an experiment config (a ConfigDict, or a nested dict as in config.json).

  Raises:
    UserError: one line naming each bad field (dotted, as in `--config.FIELD=`), its value and
      what is allowed; several problems are joined with '; ' so one run shows them all.
  """
  problems: dict[str, str] = {}
  for field, rule in RULES.items():
    value = _lookup(config, field)
    if value is not _MISSING and (problem := _problem(field, rule, value)):
      problems[field] = problem
  for field, other, strict in LESS_THAN:
    value, limit = _lookup(config, field), _lookup(config, other)
    # Only between two present, individually valid values: one message per mistake.
    if (
      field in problems
      or other in problems
      or any(v is _MISSING or v is None for v in (value, limit))
    ):
      continue
    if not (value < limit if strict else value <= limit):
      relation = '<' if strict else '<='
      problems[field] = (
        f'config field {field} must be {relation} {other} ({limit!r}), got {value!r}'
      )
  if problems:
    raise UserError('; '.join(problems.values()))


def validate_workdir(workdir: str) -> None:
  """Refuses an empty `--workdir`, which would write checkpoints into the current directory.

  Raises:
    UserError: `workdir` is not a string, or empty or only whitespace.
  """
  if not isinstance(workdir, str) or not workdir.strip():
    raise UserError(f'--workdir must not be empty, got {workdir!r}')
