"""Config loading, overrides and validation: every bad value is rejected by name."""

import pathlib

import pytest

from gemini_mini import config as config_lib
from gemini_mini.config import ConfigError
from gemini_mini.layers import similar_token_reach

PRESETS = sorted(pathlib.Path('configs').glob('*.yaml'))


def test_presets_exist():
  assert {p.stem for p in PRESETS} >= {'test', 'nano', 'pro', 'ultra'}


@pytest.mark.parametrize('path', PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_and_round_trips(path):
  config = config_lib.load(path)
  assert config_lib.from_dict(config.to_dict()) == config


@pytest.mark.parametrize('path', PRESETS, ids=lambda p: p.stem)
def test_every_preset_finds_keys_by_content_over_its_whole_length(path):
  # Men et al. 2024: past this reach RoPE favours a random key over one like the query.
  model = config_lib.load(path).model
  reach = similar_token_reach(model.head_dim, model.rope_max_wavelength, model.max_length)
  assert reach == model.max_length, (
      f'{path}: model.rope_max_wavelength={model.rope_max_wavelength} reaches {reach} of '
      f'model.max_length={model.max_length} positions')


def test_overrides_use_the_command_line_syntax():
  config = config_lib.load('configs/nano.yaml', [
      'model.num_layers=2', 'train.learning_rate=3e-4', 'train.run_dir=/tmp/x',
      'model.shared_expert=true', 'mesh.data=2', 'model.moe_dispatch=capacity'])
  assert config.model.num_layers == 2
  assert config.train.learning_rate == 3e-4 and isinstance(config.train.learning_rate, float)
  assert config.train.run_dir == '/tmp/x'
  assert config.model.shared_expert is True and config.mesh.data == 2
  assert config.model.moe_dispatch == 'capacity'


def test_int_is_accepted_for_a_float_field():
  assert config_lib.load(None, ['model.capacity_factor=2']).model.capacity_factor == 2.0


def test_defaults_without_a_file_are_the_nano_model():
  assert config_lib.load(None).model == config_lib.load('configs/nano.yaml').model


@pytest.mark.parametrize('overrides, key, hint', [
    (['model.d_modle=3'], 'model.d_modle', "did you mean 'd_model'"),
    (['modle.d_model=3'], 'modle', "did you mean 'model'"),
    (['model.d_model=big'], 'model.d_model', 'expected int'),
    (['model.d_model=2.5'], 'model.d_model', 'expected int'),
    (['model.shared_expert=1'], 'model.shared_expert', 'expected bool'),
    (['model.num_layers=true'], 'model.num_layers', 'expected int'),
    (['model.d_model=0'], 'model.d_model', 'must be positive'),
    (['model.num_heads=8', 'model.num_kv_heads=3'], 'model.num_kv_heads', 'does not divide'),
    (['model.head_dim=15'], 'model.head_dim', 'even head_dim'),
    (['model.num_experts=4', 'model.experts_per_token=5'], 'model.experts_per_token',
     'top-k of 5 is impossible'),
    (['model.moe_every=9'], 'model.moe_every', 'num_layers'),
    (['model.capacity_factor=0'], 'model.capacity_factor', 'must be positive'),
    (['model.moe_dispatch=magic'], 'model.moe_dispatch', "'magic' is not one of"),
    (['model.attention_kernel=flash'], 'model.attention_kernel', 'not one of'),
    (['model.dtype=float16'], 'model.dtype', 'not one of'),
    (['model.attention_window=-1'], 'model.attention_window', '>= 0'),
    (['train.seq_len=99999'], 'train.seq_len', 'exceeds model.max_length'),
    (['train.learning_rate=-1'], 'train.learning_rate', 'must be positive'),
    (['train.steps=0'], 'train.steps', 'must be positive'),
    (['mesh.data=-1', 'mesh.fsdp=-1'], 'mesh', 'only one axis may be -1'),
    (['mesh.tensor=0'], 'mesh.tensor', '>= 1 or -1'),
    (['data.num_patches=0'], 'data.num_patches', 'must be positive'),
    (['data.repeat_only_until_loss=-1'], 'data.repeat_only_until_loss', '>= 0'),
])
def test_bad_values_are_rejected_by_name(overrides, key, hint):
  with pytest.raises(ConfigError) as error:
    config_lib.load('configs/nano.yaml', overrides)
  message = str(error.value)
  assert message.startswith(key + ':') and hint in message, message


def test_moe_fields_are_not_checked_for_a_dense_model():
  config = config_lib.load(None, ['model.num_experts=0', 'model.experts_per_token=3'])
  assert not any(config.model.is_moe_layer(i) for i in range(config.model.num_layers))


@pytest.mark.parametrize('override', ['model.d_model', 'd_model=3', '=3'])
def test_malformed_overrides(override):
  with pytest.raises(ConfigError, match='section.field=value'):
    config_lib.load(None, [override])


def test_bad_files(tmp_path):
  with pytest.raises(ConfigError, match='config file not found'):
    config_lib.load(tmp_path / 'missing.yaml')
  broken = tmp_path / 'broken.yaml'
  broken.write_text('model: [1, 2\n')
  with pytest.raises(ConfigError, match='not valid YAML'):
    config_lib.load(broken)
  scalar = tmp_path / 'scalar.yaml'
  scalar.write_text('model: 5\n')
  with pytest.raises(ConfigError, match='model: expected a mapping'):
    config_lib.load(scalar)
  unknown = tmp_path / 'unknown.yaml'
  unknown.write_text('model:\n  num_expert: 4\n')
  with pytest.raises(ConfigError, match=r"model.num_expert: unknown key in .*num_experts"):
    config_lib.load(unknown)


def test_moe_layer_placement():
  model = config_lib.load(None, ['model.num_layers=6', 'model.moe_every=2']).model
  assert [model.is_moe_layer(i) for i in range(6)] == [False, True] * 3
