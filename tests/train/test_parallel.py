"""Mesh construction and the logical-axis rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from gemini_mini import config as config_lib, parallel
from gemini_mini.config import ConfigError, MeshConfig


@pytest.mark.parametrize('sizes, devices, expected', [
    (dict(data=-1), 8, (8, 1, 1, 1)),
    (dict(data=2, fsdp=-1), 8, (2, 4, 1, 1)),
    (dict(data=1, fsdp=2, expert=2, tensor=-1), 8, (1, 2, 2, 2)),
    (dict(data=2, fsdp=2, expert=1, tensor=2), 8, (2, 2, 1, 2)),
])
def test_mesh_shape_resolves_the_rest(sizes, devices, expected):
  assert parallel.mesh_shape(MeshConfig(**sizes), devices) == expected


@pytest.mark.parametrize('sizes, devices, message', [
    (dict(data=3), 8, 'use 3 devices but 8 are present'),
    (dict(data=-1, fsdp=3), 8, 'do not divide the 8 devices'),
])
def test_impossible_meshes_are_named(sizes, devices, message):
  with pytest.raises(ConfigError, match=message):
    parallel.mesh_shape(MeshConfig(**sizes), devices)


def test_logical_names_map_through_the_rules_and_indivisible_dims_replicate():
  mesh = jax.make_mesh((1, 1, 1, 1), parallel.AXES, devices=jax.devices()[:1])
  assert parallel.logical_spec(('expert', 'embed', 'mlp')) == PartitionSpec('expert', 'fsdp', 'tensor')
  assert parallel.logical_spec(('batch', 'length', 'activation_embed')) == PartitionSpec(
      parallel.BATCH_AXES, None, None)

  class FakeMesh:  # logical_spec only reads axis sizes
    shape = {'data': 2, 'fsdp': 4, 'expert': 2, 'tensor': 2}
  # One key/value head (multi-query) cannot be split over tensor=2: it is replicated.
  assert parallel.logical_spec(('embed', 'kv_heads', 'head_dim'), (64, 1, 16), FakeMesh()) == \
      PartitionSpec('fsdp', None, None)
  assert parallel.logical_spec(('embed', 'heads', 'head_dim'), (64, 4, 16), FakeMesh()) == \
      PartitionSpec('fsdp', 'tensor', None)
  assert mesh.shape == {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1}


def test_constrain_is_a_no_op_without_a_mesh():
  x = np.ones((2, 3, 4), np.float32)
  assert parallel.constrain(jax.numpy.asarray(x), ('batch', 'length', 'activation_embed')).shape == x.shape


def test_every_preset_has_a_mesh_on_one_device():
  for preset in ('test', 'nano', 'pro'):
    config = config_lib.load(f'configs/{preset}.yaml')
    assert parallel.mesh_shape(config.mesh, 1) == (1, 1, 1, 1)
