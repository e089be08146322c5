"""Config loading, overrides and validation: every bad value is rejected by name."""

import dataclasses
import pathlib

import pytest

from gemini_mini import config as config_lib
from gemini_mini.config import ConfigError
from gemini_mini.data.tasks import TASK_NAMES
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
    (['data.weights.txet=1'], 'data.weights.txet', "unknown task (did you mean 'text'?)"),
    (['data.weights.poetry=1'], 'data.weights.poetry',
     'the tasks of data/tasks.py are text, caption, speech, video, haystack'),
    (['data.weights.text=-0.1'], 'data.weights.text', 'must be a number >= 0'),
    (['data.weights.text=.inf'], 'data.weights.text', 'must be a number >= 0'),
    (['data.weights.text=many'], 'data.weights.text', 'expected float'),
    (['data.weights={text: 0, caption: 0}'], 'data.weights', 'every task weight is 0'),
    (['data.weights={}'], 'data.weights', 'every task weight is 0'),
    (['data.weights=[text]'], 'data.weights', 'expected a mapping'),
    (['data.text_weight=0.3'], 'data.text_weight', 'renamed: write data.weights.text'),
    (['model.d_model.wide=3'], 'model.d_model.wide', 'model.d_model is not a mapping'),
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


def test_task_weights_are_one_mapping_over_the_registered_tasks():
  assert config_lib.load(None).data.weights == {
      'text': 0.55, 'caption': 0.15, 'speech': 0.15, 'video': 0.15}
  one = config_lib.load('configs/nano.yaml', ['data.weights.text=0.3', 'data.weights.keyword=1'])
  nano = config_lib.load('configs/nano.yaml').data.weights
  assert one.data.weights == {**nano, 'text': 0.3, 'keyword': 1.0}
  replaced = config_lib.load('configs/nano.yaml', ['data.weights={needle_list: 2}'])
  assert replaced.data.weights == {'needle_list': 2.0}
  every = config_lib.load(None, [f'data.weights.{task}=1' for task in TASK_NAMES])
  assert tuple(every.data.weights) == TASK_NAMES


def test_weights_in_yaml_and_the_old_fields_named_with_the_new_spelling(tmp_path):
  path = tmp_path / 'mix.yaml'
  path.write_text('data:\n  weights:\n    text: 0.2\n    repeat: 1\n')
  assert config_lib.load(path).data.weights == {'text': 0.2, 'repeat': 1.0}
  path.write_text('data:\n  repeat_weight: 1\n')
  with pytest.raises(ConfigError, match=r'^data.repeat_weight: renamed: write data.weights.repeat'):
    config_lib.load(path)


def test_a_config_saved_with_one_field_per_task_weight_still_loads():
  # How a checkpoint saved before data.weights holds nano's config: every task's field.
  old_fields = {'text_weight': 0.2, 'caption_weight': 0.37, 'speech_weight': 0.12,
                'video_weight': 0.06, 'haystack_weight': 0.08, 'arithmetic_weight': 0.12,
                'audio_haystack_weight': 0.05, 'repeat_weight': 0.3, 'word_frame_weight': 0.6,
                'keyword_weight': 0.0, 'needle_list_weight': 0.0}
  nano = config_lib.load('configs/nano.yaml')
  saved = nano.to_dict()
  del saved['data']['weights']
  saved['data'].update(old_fields)
  config = config_lib.from_dict(saved)
  assert {task: w for task, w in config.data.weights.items() if w} == nano.data.weights
  assert dataclasses.replace(config, data=dataclasses.replace(
      config.data, weights=nano.data.weights)) == nano
  # With an override on top, as eval.py applies them to a saved config.
  saved['data']['weights.text'] = 0.5
  assert config_lib.from_dict(saved).data.weights['text'] == 0.5
  # Fields left out (saved before their task existed) had their defaults.
  assert config_lib.from_dict({'data': {'haystack_weight': 0.2}}).data.weights == {
      'text': 0.55, 'caption': 0.15, 'speech': 0.15, 'video': 0.15, 'haystack': 0.2}


def test_a_preset_states_only_what_differs_from_its_base(tmp_path):
  (tmp_path / 'base.yaml').write_text(
      'model: {d_model: 128, num_layers: 2}\ndata: {weights: {text: 1.0, caption: 1.0}}\n'
      'train: {steps: 7}\n')
  (tmp_path / 'child.yaml').write_text(
      'base: base.yaml\nmodel: {num_layers: 3}\ndata: {weights: {arithmetic: 1.0}}\n')
  config = config_lib.load(tmp_path / 'child.yaml', ['train.seed=5'])
  assert (config.model.d_model, config.model.num_layers) == (128, 3)  # field by field
  assert config.data.weights == {'arithmetic': 1.0}  # a mapping is one field: replaced whole
  assert (config.train.steps, config.train.seed) == (7, 5)
  (tmp_path / 'loop.yaml').write_text('base: loop.yaml\n')
  with pytest.raises(config_lib.ConfigError, match='leads back to itself'):
    config_lib.load(tmp_path / 'loop.yaml')
  (tmp_path / 'orphan.yaml').write_text('base: missing.yaml\n')
  with pytest.raises(config_lib.ConfigError, match='missing.yaml: config file not found'):
    config_lib.load(tmp_path / 'orphan.yaml')


def test_post_training_stages_name_what_they_need():
  with pytest.raises(config_lib.ConfigError, match='train.init_from'):
    config_lib.load('configs/nano.yaml', ['train.stage=sft'])
  with pytest.raises(config_lib.ConfigError, match='model.scalar_head'):
    config_lib.load('configs/nano.yaml', ['train.stage=reward', 'train.init_from=runs/a'])
  with pytest.raises(config_lib.ConfigError, match='post.reward_from'):
    config_lib.load('configs/nano_rlhf.yaml', ['post.reward_from='])
  with pytest.raises(config_lib.ConfigError, match="this run's own"):
    config_lib.load('configs/nano_sft.yaml', ['train.init_from=runs/nano_sft'])
  with pytest.raises(config_lib.ConfigError, match='post.label_noise'):
    config_lib.load('configs/nano_rm.yaml', ['post.label_noise=0.5'])
  with pytest.raises(config_lib.ConfigError, match='train.grad_accum_steps'):
    config_lib.load('configs/nano_dpo.yaml', ['train.grad_accum_steps=2'])
