"""Convolution inputs behind optimization barriers: one per conv call, kept by XLA:CPU, identity."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_setup_and_batch, train_step_calls

from gaternet_jax.cpu import flags as cpu_flags
from gaternet_jax.cpu import materialize
from gaternet_jax.training import steps

KEEP_BARRIERS = cpu_flags.KEEP_BARRIERS_FLAG


@pytest.fixture(scope='module')
def gated():
  return tiny_setup_and_batch('gated')


@pytest.mark.slow
def test_every_conv_input_gets_one_barrier_in_the_cpu_train_step(gated):
  setup, batch = gated
  assert steps.platform(setup) == 'cpu'
  state = steps.create_state(setup, 0)
  step = jax.jit(functools.partial(steps.train_step, setup=setup))
  text = step.lower(state, batch, jax.random.key(0)).as_text()
  convs = train_step_calls(setup, batch, nn.Conv)
  assert convs > 10  # the ResNet-8 backbone and its ResNet-8 gater
  # Forward barriers plus their transposes in the backward pass (one per differentiated input).
  assert text.count('stablehlo.optimization_barrier') >= convs
  eval_text = (
    jax.jit(functools.partial(steps.eval_step, setup=setup))
    .lower(state, dict(batch, mask=jnp.ones(16)))
    .as_text()
  )
  assert 'optimization_barrier' not in eval_text  # evaluation has no backward pass to help


@pytest.mark.skipif(
  KEEP_BARRIERS not in os.environ.get('XLA_FLAGS', ''), reason='needs the CPU XLA flags'
)
def test_the_cpu_flags_keep_the_barriers_through_compilation(gated):
  assert KEEP_BARRIERS in cpu_flags.CPU_XLA_FLAGS
  setup, batch = gated
  state = steps.create_state(setup, 0)
  step = jax.jit(functools.partial(steps.train_step, setup=setup))
  compiled = step.lower(state, batch, jax.random.key(0)).compile().as_text()
  assert compiled.count('opt-barrier(') >= train_step_calls(setup, batch, nn.Conv)


@pytest.mark.slow
def test_barriers_change_no_value(gated):
  setup, batch = gated
  state = steps.create_state(setup, 0)

  def loss_and_grads(enabled):
    def loss(params):
      with materialize.conv_inputs_materialized(enabled):
        (logits, _), _ = setup.model.apply(
          {'params': params, 'batch_stats': state.batch_stats},
          steps.preprocess(setup.config, setup.info, batch['image'], None),
          train=True,
          rngs={'gates': jax.random.key(1)},
          mutable=['batch_stats'],
        )
      return jnp.mean(logits**2)

    return jax.jit(jax.value_and_grad(loss))(state.params)

  (with_value, with_grads), (without_value, without_grads) = (
    loss_and_grads(True),
    loss_and_grads(False),
  )
  np.testing.assert_allclose(with_value, without_value, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(with_grads), jax.tree.leaves(without_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
