"""Feeding batches to the devices: global arrays from per-process data, device-resident sets.

Every training and evaluation batch is one global array sharded over the mesh's `data` axis; on
several hosts each process contributes only its own rows (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gaternet_jax.errors import UserError


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A global batch from this process's part of it."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


class ResidentTrainData:
  """A small training set kept on the devices as uint8; batches are drawn inside a jitted function.

  The set is split into one equal shard per device (each process provides its own devices' part,
  so each host holds only its share). Every epoch each shard is permuted with a key derived from
  (key, epoch, shard), and step `s` takes the `s % steps_per_epoch`-th slice of each shard's
  permutation: the batch is a pure function of the step, so resuming needs only the step.

  The permutations are made once per epoch (`epoch_orders`), outside the training step, and the
  step only slices them (`sample`): a permutation is a sort of the whole shard, 21 ms for 45,000
  examples on the 2-core development CPU (a ResNet-20 step there takes ~140 ms), so drawing it in
  every step cost more than a tenth of CIFAR training.
  """

  def __init__(
    self,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_train: int,
    batch_size: int,
    sharding: NamedSharding,
    key: jax.Array,
  ):
    """Places this process's share of the training set on its devices.

    Args:
      images: this process's training images, uint8 (n, H, W, C).
      labels: their labels, int32 (n,).
      num_train: the global number of training examples (all processes).
      batch_size: the global batch size.
      sharding: a sharding over a 1-D `data` mesh of every device.
      key: orders the examples (a replicated PRNG key).
    """
    mesh = sharding.mesh
    num_devices = mesh.size
    local_devices = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    self.per_device = num_train // num_devices
    self.device_batch = batch_size // num_devices
    if self.per_device < self.device_batch:
      raise UserError(
        f'{num_train} training examples are too few for batch_size '
        f'{batch_size} on {num_devices} devices'
      )
    self.steps_per_epoch = self.per_device // self.device_batch
    shape = images.shape[1:]
    # This process holds the examples of its devices (`data.base.ProcessSlice.train_share`),
    # ascending: its j-th device's are every local_devices-th one from the j-th.
    take = lambda a, j: a[j::local_devices][: self.per_device]  # noqa: E731
    local_images = np.stack([take(images, j) for j in range(local_devices)])
    local_labels = np.stack([take(labels, j) for j in range(local_devices)])
    self.images = jax.make_array_from_process_local_data(
      sharding, local_images, (num_devices, self.per_device, *shape)
    )
    self.labels = jax.make_array_from_process_local_data(
      sharding, local_labels, (num_devices, self.per_device)
    )
    self.key = key
    # Orders are [epochs, shards, per_device], each shard's rows on its own device.
    self.orders_sharding = NamedSharding(mesh, P(None, *sharding.spec))
    self._sample = jax.jit(self.sample, out_shardings=sharding)
    self._epoch_orders = jax.jit(
      self.epoch_orders, static_argnames='epochs', out_shardings=self.orders_sharding
    )
    self._last_orders = (None, None)  # ((first_epoch, epochs), their orders)

  def epoch_orders(self, key: jax.Array, first_epoch: jax.Array, epochs: int) -> jax.Array:
    """int32 [epochs, shards, per_device]: each shard's example order in epochs first_epoch.. .

    Shard d's order in epoch e is a permutation of its examples drawn with the key
    fold_in(fold_in(key, e), d).
    """

    def order(epoch, shard_id):
      shard_key = jax.random.fold_in(jax.random.fold_in(key, epoch), shard_id)
      return jax.random.permutation(shard_key, self.per_device)

    # The shard index is a global iota: each device gets its own shard's id, wherever its
    # process's devices sit in the mesh.
    shard_ids = jnp.arange(self.images.shape[0], dtype=jnp.int32)
    epoch_ids = first_epoch + jnp.arange(epochs, dtype=jnp.int32)
    return jax.vmap(lambda e: jax.vmap(lambda d: order(e, d))(shard_ids))(epoch_ids)

  def orders(self, first_epoch: int, epochs: int = 1) -> jax.Array:
    """`epoch_orders` for `epochs` epochs from `first_epoch`, placed like the examples; the last
    ones asked for are kept, so consecutive steps of one epoch draw them once."""
    if self._last_orders[0] != (first_epoch, epochs):
      drawn = self._epoch_orders(self.key, jnp.int32(first_epoch), epochs=epochs)
      self._last_orders = ((first_epoch, epochs), drawn)
    return self._last_orders[1]

  def sample(self, images, labels, orders, first_epoch, step):
    """The global batch of training step `step` (traceable: called inside jitted loops).

    `orders` are `orders(first_epoch, n)`, with step's epoch among those n.
    """
    epoch = step // self.steps_per_epoch
    offset = (step % self.steps_per_epoch) * self.device_batch

    def take(shard_images, shard_labels, shard_orders):
      order = jax.lax.dynamic_index_in_dim(shard_orders, epoch - first_epoch, keepdims=False)
      idx = jax.lax.dynamic_slice_in_dim(order, offset, self.device_batch)
      return shard_images[idx], shard_labels[idx]

    batch_images, batch_labels = jax.vmap(take, in_axes=(0, 0, 1))(images, labels, orders)
    return {
      'image': batch_images.reshape(-1, *batch_images.shape[2:]),
      'label': batch_labels.reshape(-1),
    }

  def batch(self, step: int) -> dict[str, jax.Array]:
    epoch = step // self.steps_per_epoch
    orders = self.orders(epoch)
    return self._sample(self.images, self.labels, orders, jnp.int32(epoch), jnp.int32(step))


class MemberOrders(ResidentTrainData):
  """The resident set for a population trained as one program: one example order per member.

  `keys` are the members' stacked order keys; `orders` returns [members, epochs, shards,
  per_device], member m's being exactly what `ResidentTrainData` with key `keys[m]` draws, so each
  member sees the batches it would see trained alone. The images are held once for all members.
  """

  def __init__(self, images, labels, *, num_train, batch_size, sharding, keys):
    super().__init__(
      images, labels, num_train=num_train, batch_size=batch_size, sharding=sharding, key=keys
    )
    self.orders_sharding = NamedSharding(sharding.mesh, P(None, None, *sharding.spec))

    def member_orders(keys, first_epoch, epochs):
      return jax.vmap(lambda key: self.epoch_orders(key, first_epoch, epochs))(keys)

    self._epoch_orders = jax.jit(
      member_orders, static_argnames='epochs', out_shardings=self.orders_sharding
    )
