"""Parameter counts: total and active per token, and every parameter's shape, from shapes only."""

import math
import subprocess
import sys

from gemini_mini import config as config_lib
from gemini_mini.param_count import count_params, param_shapes


def test_nano_matches_the_peer_shape_plus_encoders():
  # shared/peers/README.md: the shared shape (= nano without image/audio encoders, with an
  # output head of its own) has 17,443,072 parameters, 8,005,888 active per token.
  m = config_lib.load('configs/nano.yaml', ['model.tie_embeddings=false']).model
  encoders = (m.patch_dim + m.audio_dim) * m.d_model + 2 * (3 * m.d_model * m.d_ff + m.d_model)
  assert count_params(m) == {'total': 17_443_072 + encoders, 'active': 8_005_888 + encoders}


def test_active_equals_total_for_a_dense_model():
  counts = count_params(config_lib.load(None, ['model.num_experts=0']).model)
  assert counts['active'] == counts['total']


def test_tied_embeddings_drop_the_output_matrix():
  untied = config_lib.load('configs/test.yaml', ['model.tie_embeddings=false']).model
  tied = config_lib.load('configs/test.yaml', ['model.tie_embeddings=true']).model
  assert 'text/unembedding_DV' in param_shapes(untied)
  assert 'text/unembedding_DV' not in param_shapes(tied)
  saved = untied.vocab_size * untied.d_model
  assert count_params(tied) == {key: value - saved for key, value in count_params(untied).items()}


def test_param_shapes_name_every_parameter_and_add_up_to_the_total():
  m = config_lib.load('configs/test.yaml').model
  shapes = param_shapes(m)
  assert sum(math.prod(shape) for shape in shapes.values()) == count_params(m)['total']
  # test.yaml: layer 0 dense, layer 1 MoE (moe_every 2).
  assert shapes['blocks/0/ffn/gate_DF'] == (m.d_model, m.d_ff)
  assert shapes['blocks/1/ffn/gate_EDF'] == (m.num_experts, m.d_model, m.d_ff)
  assert shapes['blocks/1/ffn/router/w_DE'] == (m.d_model, m.num_experts)
  assert shapes['blocks/1/attention/q_DNH'] == (m.d_model, m.num_heads, m.head_dim)
  assert shapes['text/embedding_VD'] == (m.vocab_size, m.d_model)
  scanned = param_shapes(config_lib.load('configs/test.yaml', ['model.scan_layers=true']).model)
  assert scanned['groups/blocks/1/ffn/gate_EDF'] == (1, m.num_experts, m.d_model, m.d_ff)


def test_cli_prints_every_preset():
  result = subprocess.run([sys.executable, '-m', 'gemini_mini.param_count'],
                          capture_output=True, text=True, check=True)
  for preset in ('test', 'nano', 'pro', 'ultra'):
    assert f'configs/{preset}.yaml' in result.stdout


def test_cli_names_a_bad_config(tmp_path):
  bad = tmp_path / 'bad.yaml'
  bad.write_text('model:\n  num_heads: 4\n  num_kv_heads: 3\n')
  result = subprocess.run([sys.executable, '-m', 'gemini_mini.param_count', str(bad)],
                          capture_output=True, text=True)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith('model.num_kv_heads:')
