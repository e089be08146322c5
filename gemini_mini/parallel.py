"""Device mesh, the logical-axis rules table, and sharding helpers.

The mesh has four axes, sized by ``MeshConfig`` (-1 takes the remaining devices):

  data    pure data parallelism: the batch is split, parameters replicated
  fsdp    data parallelism with parameters and optimizer state split along ``embed``
  expert  experts split across devices (the batch is split over it too)
  tensor  heads, MLP hidden units and the vocabulary split (Megatron style)

Parameters carry logical axis names from the layers (``layers.param``); ``RULES`` maps them
onto mesh axes. A dimension that a mesh axis does not divide is replicated instead (e.g. the
single key/value head of multi-query attention), so every preset runs on every mesh.
The same code runs on one device (a 1x1x1x1 mesh), fake CPU devices, GPUs and TPU pods.
"""

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gemini_mini.config import ConfigError, MeshConfig

AXES = ('data', 'fsdp', 'expert', 'tensor')
BATCH_AXES = ('data', 'fsdp', 'expert')

# logical name -> mesh axes. Parameters use the layer names; activations use `batch`,
# `length` and `activation_embed` (never split over fsdp: only parameters are).
RULES = (
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('expert', 'expert'),
    ('features', None),
    ('layers', None),  # the stacked layer-group axis of model.scan_layers: never split
    ('batch', BATCH_AXES),
    ('length', None),
    ('activation_embed', None),
)


def mesh_shape(mesh_config: MeshConfig, num_devices: int) -> tuple[int, ...]:
  """Axis sizes with -1 resolved; their product must equal ``num_devices``."""
  sizes = [getattr(mesh_config, axis) for axis in AXES]
  fixed = math.prod(size for size in sizes if size != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(f'mesh: the fixed axes {dict(zip(AXES, sizes))} (product {fixed}) do '
                        f'not divide the {num_devices} devices; choose sizes that divide it')
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'mesh: axis sizes {dict(zip(AXES, sizes))} use {math.prod(sizes)} '
                      f'devices but {num_devices} are present; set one axis to -1 to take the rest')
  return tuple(sizes)


def make_mesh(mesh_config: MeshConfig, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def logical_spec(logical_axes, shape=None, mesh: Mesh | None = None) -> PartitionSpec:
  """Mesh ``PartitionSpec`` for logical axis names; with ``shape`` and ``mesh``, dimensions
  not divisible by their mesh axes are replicated."""
  rules = dict(RULES)
  spec = []
  for dim, name in enumerate(logical_axes):
    axes = rules.get(name) if name is not None else None
    if axes is not None and shape is not None and mesh is not None:
      axes_tuple = axes if isinstance(axes, tuple) else (axes,)
      if shape[dim] % math.prod(mesh.shape[a] for a in axes_tuple):
        axes = None
    spec.append(axes)
  return PartitionSpec(*spec)


def state_shardings(abstract_tree, mesh: Mesh):
  """``NamedSharding`` for every leaf of an (abstract) pytree holding ``nnx.Variable``s
  (parameters, optimizer moments) and plain arrays: variables are split by their logical
  axis names (``out_sharding`` metadata), everything else is replicated."""
  def sharding(leaf):
    if not isinstance(leaf, nnx.Variable):
      return NamedSharding(mesh, PartitionSpec())
    names = leaf.get_metadata().get('out_sharding') or (None,) * len(leaf.shape)
    return leaf.replace(NamedSharding(mesh, logical_spec(names, leaf.shape, mesh)))
  return jax.tree.map(sharding, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays: the leading (batch) axis split over ``data``, ``fsdp`` and ``expert``."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def constrain(x: jax.Array, logical_axes) -> jax.Array:
  """Sharding constraint by logical names inside ``jax.set_mesh``; a no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(logical_axes, x.shape, mesh))


def host_local_to_global(batch, mesh: Mesh):
  """This process's rows of a batch (numpy) -> global ``jax.Array``s sharded over the batch
  axes. With one process it is a plain ``device_put``."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
