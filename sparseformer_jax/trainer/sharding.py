"""The device mesh, how each array is laid out on it, and global batches from per-host data.

Mesh axes: 'data' (pure data parallelism) and 'fsdp' (data parallelism that also shards params
and optimizer state, for the large variants). Batches are split over both axes; with fsdp == 1
every param is replicated.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')
# Arrays smaller than this stay replicated under fsdp: sharding them saves nothing worth a
# collective.
_MIN_FSDP_SIZE = 2**14


def create_mesh(mesh_config) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices of all processes; data=-1 takes what is left."""
  fsdp = mesh_config.fsdp
  data = jax.device_count() // fsdp if mesh_config.data == -1 else mesh_config.data
  return jax.make_mesh((data, fsdp), BATCH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device; the other axes whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def _leaf_sharding(mesh: Mesh, shape) -> NamedSharding:
  """fsdp: shard the largest axis that the fsdp size divides; else replicate."""
  fsdp = mesh.shape['fsdp']
  if fsdp == 1 or np.prod(shape, dtype=np.int64) < _MIN_FSDP_SIZE:
    return replicated(mesh)
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = 'fsdp'
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def state_shardings(abstract_state, mesh: Mesh):
  """Shardings for a pytree of ShapeDtypeStructs (params, EMA and optimizer state alike)."""
  return jax.tree.map(lambda x: _leaf_sharding(mesh, x.shape), abstract_state)


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry their target sharding (what Orbax restores onto)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def pad_batch(batch: dict, size: int) -> dict:
  """Pads every array of a host batch to `size` rows; padded rows get mask False."""
  n = len(batch['mask'])
  if n == size:
    return batch
  return {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """One global jax.Array per entry, from this process's rows (processes in order)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
