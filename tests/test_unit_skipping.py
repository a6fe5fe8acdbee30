"""Skipping off units (models.with_unit_skipping): the same outputs with less work.

A GaterNet unit whose gates are all off for the whole batch computes exactly its shortcut
(eq. 4 zeroes every gated output), so evaluation may skip its convolutions; these tests check
the skipping model against the masked one, one image at a time (where units are skipped image
by image) and on a batch, for every ResNet family and for an export.
"""

import functools

import jax
import numpy as np
import pytest
from conftest import perturbed
from test_export import DYNAMIC, FAMILIES, OFF, engineered_fc2, gaternet, with_fc2

from gaternet_jax import models
from gaternet_jax.commands import export
from gaternet_jax.errors import UserError
from gaternet_jax.layout import layer_offsets
from gaternet_jax.models.gaternet import Classifier
from gaternet_jax.models.resnet_cifar import CifarResNet

# Squeeze-and-excitation sits before the gate, so a unit with every gate off is its shortcut too.
SKIPPING_FAMILIES = {
  **FAMILIES,
  'cifar_basic_se': functools.partial(CifarResNet, depth=8, num_classes=10, se_reduction=4),
}


def sparse_kinds(model_layout, seed: int) -> np.ndarray:
  """Gates that are always off or input-dependent (no always-on one, which would keep its
  unit computed), at most two input-dependent per layer and none in every third layer, so an
  image leaves some units wholly off and turns others on."""
  rng = np.random.default_rng(seed)
  kinds = []
  for i, layer in enumerate(model_layout):
    k = np.full(layer.filters, OFF)
    if i % 3 != 0:
      k[rng.choice(layer.filters, size=min(2, layer.filters), replace=False)] = DYNAMIC
    kinds.append(k)
  return np.concatenate(kinds)


def conditionals(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count('cond[')


@pytest.mark.slow
@pytest.mark.parametrize('family', sorted(SKIPPING_FAMILIES))
def test_skipping_off_units_changes_no_output(family):
  source = gaternet(SKIPPING_FAMILIES[family])
  x = jax.random.normal(jax.random.key(1), (12, 32, 32, 3))
  variables = perturbed(source.init(jax.random.key(0), x, train=False), 2)
  model_layout = source.backbone.gate_layout((32, 32, 3))
  kinds = sparse_kinds(model_layout, seed=3)
  logits_of = lambda fc2: source.apply(with_fc2(variables, fc2), x, train=False)[1]['gate_logits']
  variables = with_fc2(variables, engineered_fc2(kinds, 8, logits_of))
  skipping = models.with_unit_skipping(source)
  masked_fn = jax.jit(lambda v, x: source.apply(v, x, train=False))
  skip_fn = jax.jit(lambda v, x: skipping.apply(v, x, train=False))
  # One conditional per unit with a gate; none in training, where gradients need every unit.
  assert conditionals(skip_fn, variables, x) == len(model_layout)
  assert conditionals(lambda v, x: skipping.apply(v, x, train=True, mutable=['batch_stats'],
                                                  rngs={'gates': jax.random.key(0)}),
                      variables, x) == 0  # fmt: skip

  logits, aux = masked_fn(variables, x)
  skip_logits, skip_aux = skip_fn(variables, x)
  # The same values up to the rounding of a separately compiled branch (on an AVX-512 host XLA
  # fuses a conditional's branch differently; ~1 ulp); a unit skipped wrongly is off by far more.
  np.testing.assert_allclose(skip_logits, logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(skip_aux['gates'], aux['gates'])

  gates = np.asarray(aux['gates']) > 0.5
  unit_on = np.logical_or.reduceat(gates, layer_offsets(model_layout)[:-1], axis=1)
  assert (unit_on.any(0) & ~unit_on.all(0)).any(), 'some unit is on for some images only'
  for i in range(len(x)):  # one image at a time: each skips the units it left off
    one_logits, _ = skip_fn(variables, x[i : i + 1])
    np.testing.assert_allclose(one_logits[0], logits[i], rtol=1e-5, atol=1e-5)

  if family not in FAMILIES:
    return  # SE units cannot be exported
  # An export (no always-on filter kept here) skips its units the same way.
  plan, _, dynamic = export.plan_from_gates(gates, model_layout)
  pruned = gaternet(FAMILIES[family], plan)
  target = jax.eval_shape(functools.partial(pruned.init, train=False), jax.random.key(0), x)
  cut = export.prune_tree(jax.device_get(variables), target, plan, dynamic)
  pruned_skip = jax.jit(lambda v, x: models.with_unit_skipping(pruned).apply(v, x, train=False))
  for i in range(0, len(x), 4):
    np.testing.assert_allclose(pruned_skip(cut, x[i : i + 1])[0][0], logits[i], rtol=1e-4,
                               atol=1e-4)  # fmt: skip


def test_unit_skipping_refuses_models_without_gated_resnet_units():
  from gaternet_jax.models import densenet

  with pytest.raises(UserError, match='needs a GaterNet'):
    models.with_unit_skipping(Classifier(FAMILIES['cifar_basic']()))
  dense = gaternet(lambda pruning: next(iter(densenet.BACKBONES.values()))())
  with pytest.raises(UserError, match='ResNet backbones'):
    models.with_unit_skipping(dense)
