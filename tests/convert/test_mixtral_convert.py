"""Mixtral-format checkpoints in and out, against transformers' own logits.

The fixtures (tests/fixtures/make_mixtral.py, run once with transformers) are random tiny
Mixtrals in the hub layout, bfloat16, with transformers' float32 logits beside them.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from gemini_mini import Batch
from gemini_mini.checkpoint import CheckpointError
from gemini_mini.convert import __main__ as cli
from gemini_mini.convert import from_hf, mixtral, to_hf
from gemini_mini.convert.hf_files import HFFormatError
from gemini_mini.evals import haystack
from gemini_mini.infer.load import load
from gemini_mini.modalities.text import TokenizerError

FIXTURES = pathlib.Path(__file__).parent.parent / 'fixtures'
NAMES = ('mixtral_tiny', 'mixtral_top1_tied')


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """``{fixture name: run directory}``: each fixture converted once."""
  root = tmp_path_factory.mktemp('imported')
  return {name: from_hf.convert(FIXTURES / name, root / name) and root / name for name in NAMES}


def _text_batch(tokens: np.ndarray, model) -> Batch:
  batch, length = tokens.shape
  zeros = jnp.zeros((batch, length), jnp.int32)
  return Batch(tokens=jnp.asarray(tokens), modality=jnp.zeros((batch, length), jnp.int8),
               segment_ids=jnp.ones((batch, length), jnp.int32),
               positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)),
               targets=zeros, loss_mask=zeros.astype(bool),
               patches=jnp.zeros((batch, 0, model.patch_dim)),
               audio=jnp.zeros((batch, 0, model.audio_dim)))


def _params(run_dir) -> dict:
  state = nnx.state(load(run_dir).decoder, nnx.Param)
  return {'.'.join(map(str, path)): np.asarray(leaf[...])
          for path, leaf in nnx.to_flat_state(state)}


def _hf_tensors(directory) -> dict[str, np.ndarray]:
  out = {}
  for path in sorted(pathlib.Path(directory).glob('*.safetensors')):
    with safe_open(path, framework='np') as handle:
      out.update({name: handle.get_tensor(name).astype(np.float32) for name in handle.keys()})
  return out


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('dispatch, kernel', [('dropless', 'chunked'), ('capacity', 'dense')])
def test_imported_logits_equal_transformers(imported, name, dispatch, kernel):
  # Capacity of E / k slots per token drops nothing, so both dispatches compute every slot;
  # a chunk of 4 positions makes the chunked kernel cross chunks (and the sliding window).
  run = load(imported[name], [f'model.moe_dispatch={dispatch}', f'model.attention_kernel={kernel}',
                              'model.attention_chunk=4', 'model.capacity_factor=4.0'])
  tokens = np.load(FIXTURES / name / 'tokens.npy')
  logits, _ = run.decoder(_text_batch(tokens, run.config.model))
  reference = np.load(FIXTURES / name / 'logits.npy')
  assert np.abs(np.asarray(logits) - reference).max() < 1e-4


@pytest.mark.parametrize('name', NAMES)
def test_cached_decoding_of_an_import_equals_transformers(imported, name):
  run = load(imported[name])
  tokens, reference = np.load(FIXTURES / name / 'tokens.npy'), np.load(FIXTURES / name / 'logits.npy')
  model, half = run.config.model, tokens.shape[1] // 2
  cache = run.decoder.init_cache(tokens.shape[0], tokens.shape[1])
  full = _text_batch(tokens, model)
  first = _text_batch(tokens[:, :half], model)
  logits, cache = run.decoder.prefill(first, cache)
  steps = [np.asarray(logits)]
  for t in range(half, tokens.shape[1]):
    one = Batch(**{field: getattr(full, field)[:, t:t + 1] if getattr(full, field).ndim == 2
                   else getattr(full, field) for field in Batch.__dataclass_fields__})
    logits, cache = run.decoder.decode(one, cache)
    steps.append(np.asarray(logits))
  assert np.abs(np.concatenate(steps, axis=1) - reference).max() < 1e-4


def test_the_conventions_come_from_config_json(imported):
  tiny = load(imported['mixtral_tiny']).config.model
  assert (tiny.activation, tiny.norm_eps, tiny.renormalize_top_k) == ('silu', 1e-5, 'always')
  assert (tiny.num_kv_heads, tiny.tie_embeddings, tiny.attention_window) == (2, False, 0)
  tied = load(imported['mixtral_top1_tied']).config.model
  assert (tied.tie_embeddings, tied.scale_tied_logits, tied.experts_per_token) == (True, False, 1)
  assert (tied.norm_eps, tied.attention_window, tied.rope_max_wavelength) == (1e-6, 5, 500.0)


@pytest.mark.parametrize('name', NAMES)
def test_export_then_import_is_bit_identical(imported, tmp_path, name):
  exported = tmp_path / 'hf'
  to_hf.convert(imported[name], exported)
  # The export holds the source's tensors (bfloat16 there, float32 here: the same values).
  source, written = _hf_tensors(FIXTURES / name), _hf_tensors(exported)
  assert source.keys() == written.keys()
  for key in source:
    np.testing.assert_array_equal(written[key], source[key], err_msg=key)
  from_hf.convert(exported, tmp_path / 'again')
  before, after = _params(imported[name]), _params(tmp_path / 'again')
  assert before.keys() == after.keys()
  for key in before:
    np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_shards_with_and_without_an_index_read_the_same(imported, tmp_path):
  sharded = tmp_path / 'sharded'
  to_hf.convert(imported['mixtral_tiny'], sharded, shard_bytes=40_000)
  shards = sorted(p.name for p in sharded.glob('*.safetensors'))
  assert len(shards) > 3 and (sharded / 'model.safetensors.index.json').is_file()
  expected = _params(imported['mixtral_tiny'])
  from_hf.convert(sharded, tmp_path / 'with_index')
  (sharded / 'model.safetensors.index.json').unlink()
  from_hf.convert(sharded, tmp_path / 'without_index')
  for run in ('with_index', 'without_index'):
    got = _params(tmp_path / run)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=f'{run} {key}')


def test_the_fused_transformers_5_layout_reads_as_the_hub_layout(imported, tmp_path):
  # transformers 5's in-memory layout: per layer, gate.weight under mlp., experts fused into
  # gate_up_proj [E, 2F, D] (w1 rows, then w3 rows) and down_proj [E, D, F].
  hub, fused = _hf_tensors(FIXTURES / 'mixtral_tiny'), {}
  config = json.loads((FIXTURES / 'mixtral_tiny' / 'config.json').read_text())
  for name, array in hub.items():
    if '.block_sparse_moe.' not in name:
      fused[name] = array
  for layer in range(config['num_hidden_layers']):
    moe = f'model.layers.{layer}.block_sparse_moe'
    experts = range(config['num_local_experts'])
    fused[f'model.layers.{layer}.mlp.gate.weight'] = hub[f'{moe}.gate.weight']
    fused[f'model.layers.{layer}.mlp.experts.gate_up_proj'] = np.stack([np.concatenate(
        [hub[f'{moe}.experts.{e}.w1.weight'], hub[f'{moe}.experts.{e}.w3.weight']]) for e in experts])
    fused[f'model.layers.{layer}.mlp.experts.down_proj'] = np.stack(
        [hub[f'{moe}.experts.{e}.w2.weight'] for e in experts])
  source = tmp_path / 'fused'
  source.mkdir()
  shutil.copyfile(FIXTURES / 'mixtral_tiny' / 'config.json', source / 'config.json')
  save_file(fused, str(source / 'model.safetensors'))
  from_hf.convert(source, tmp_path / 'run')
  expected, got = _params(imported['mixtral_tiny']), _params(tmp_path / 'run')
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def _broken_copy(tmp_path, edit_tensors=None, edit_config=None) -> pathlib.Path:
  source = tmp_path / 'broken'
  shutil.copytree(FIXTURES / 'mixtral_tiny', source)
  if edit_tensors:
    tensors = _hf_tensors(source)
    edit_tensors(tensors)
    save_file(tensors, str(source / 'model.safetensors'))
  if edit_config:
    config = json.loads((source / 'config.json').read_text())
    edit_config(config)
    (source / 'config.json').write_text(json.dumps(config))
  return source


def _truncate(path: pathlib.Path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize('break_it, message', [
    (lambda d: _broken_copy(d, edit_tensors=lambda t: t.pop(
        'model.layers.1.block_sparse_moe.experts.2.w3.weight')),
     'missing 1 tensors: model.layers.1.block_sparse_moe.experts.2.w3.weight'),
    (lambda d: _broken_copy(d, edit_tensors=lambda t: t.update({
        'model.layers.0.self_attn.k_proj.weight': np.zeros((8, 32), np.float32)})),
     r'model.layers.0.self_attn.k_proj.weight is \[8, 32\], config.json implies \[16, 32\]'),
    (lambda d: _broken_copy(d, edit_config=lambda c: c.update(architectures=['LlamaForCausalLM'],
                                                              model_type='llama')),
     r"architectures \['LlamaForCausalLM'\]: gemini_mini converts MixtralForCausalLM"),
    (lambda d: _broken_copy(d, edit_config=lambda c: c.update(hidden_act='gelu')),
     '"hidden_act" is \'gelu\''),
    (lambda d: _truncate(_broken_copy(d) / 'model.safetensors') or d / 'broken',
     'model.safetensors: not a readable safetensors file .* truncated'),
    (lambda d: d / 'nowhere', 'no such directory'),
])
def test_a_broken_source_is_refused_by_name(tmp_path, break_it, message):
  with pytest.raises(HFFormatError, match=message):
    from_hf.convert(break_it(tmp_path), tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_a_model_mixtral_cannot_express_is_refused_naming_each_option(test_config):
  model = test_config.model  # gemini_mini's own conventions: GeGLU, a dense layer between
  with pytest.raises(mixtral.NotExpressible) as error:
    mixtral.hf_config(model.__class__(**{**model.__dict__, 'moe_every': 2,
                                         'shared_expert': True}))
  for option in ('model.activation: gelu', 'model.moe_every: 2', 'model.shared_expert'):
    assert option in str(error.value)


def test_the_cli_reports_errors_and_writes_nothing(tmp_path, capsys):
  assert cli.main(['from-hf', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'out')]) == 2
  assert 'no such directory' in capsys.readouterr().err
  assert cli.main(['from-hf', str(FIXTURES / 'mixtral_tiny'), '--out', str(tmp_path / 'out'),
                   'model.d_model=64']) == 2
  assert 'model.d_model is set by' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()


def test_the_quantizer_takes_an_imported_run(imported, tmp_path):
  from gemini_mini import quantize  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'int4'
  assert quantize.main(['--checkpoint', str(imported['mixtral_tiny']), '--bits', '4',
                        '--group', '16', '--method', 'rtn', '--out', str(out)]) == 0
  run = load(out)
  assert type(run.decoder.blocks[0].ffn.gate_EDF[...]).__name__ == 'QArray'
  tokens = np.load(FIXTURES / 'mixtral_tiny' / 'tokens.npy')
  logits, _ = run.decoder(_text_batch(tokens, run.config.model))
  assert logits.shape == (*tokens.shape, 256) and np.isfinite(np.asarray(logits)).all()


def test_a_mesh_import_reads_each_shard_its_own_experts():
  # 4 expert shards x 2 data replicas: every device's expert stack holds one expert, and the
  # import reads per device only that expert's three matrices, never the whole stack.
  script = pathlib.Path(__file__).parent / 'sharded_import.py'
  result = subprocess.run([sys.executable, str(script), str(FIXTURES / 'mixtral_tiny')],
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                          cwd=pathlib.Path(__file__).parent.parent.parent)
  assert result.returncode == 0, result.stderr[-4000:]
  runs = json.loads(result.stdout.strip().splitlines()[-1])
  one, sharded = runs['one'], runs['sharded']
  assert sorted(map(tuple, sharded['gate_shards'])) == sorted([(e, e + 1) for e in range(4)] * 2)
  assert sharded['shards_match']
  layers, experts, matrices, devices = 3, 4, 3, 8
  assert one['expert_reads'] == layers * matrices * experts  # one device reads each once
  assert sharded['expert_reads'] == layers * matrices * devices  # one expert per device
  assert one['params'].keys() == sharded['params'].keys()
  for key, values in one['params'].items():
    np.testing.assert_array_equal(sharded['params'][key], values, err_msg=key)


def test_an_import_reads_text_with_its_own_tokenizer(tmp_path, small_data_dir):
  # A tokenizer.model beside the weights becomes the run's: the haystack suite builds its
  # text prompts with it and skips the modalities it has no placeholders for; the quantized
  # directory keeps it.
  from helpers import plain_tokenizer  # pylint: disable=import-outside-toplevel
  source = tmp_path / 'hf'
  shutil.copytree(FIXTURES / 'mixtral_tiny', source)
  plain_tokenizer(source / 'tokenizer.model')
  from_hf.convert(source, tmp_path / 'run', [f'data.dir={small_data_dir}', 'data.subset=small'])
  run = load(tmp_path / 'run', ['eval.context_lengths=[96]', 'eval.trials=1'])
  assert run.tokenizer_path == str(tmp_path / 'run' / 'tokenizer.model')
  assert not run.tokenizer.multimodal and run.tokenizer.vocab_size == 200
  figures = haystack.run(run, tmp_path / 'eval')
  assert set(figures) == {'text', 'video', 'audio'}
  assert 'skipped' in figures['video'] and 'skipped' in figures['audio']
  assert 0 <= figures['text']['recall'] <= 1
  record = json.loads((tmp_path / 'eval' / 'haystack.json').read_text())
  prompt_ids = run.tokenizer.encode('The special magic number for')
  assert len(prompt_ids) < 10  # the plain tokenizer's pieces, not gemini_mini's
  assert all(item['modality'] == 'text' for item in record['items'])
  from gemini_mini import quantize  # pylint: disable=import-outside-toplevel
  assert quantize.main(['--checkpoint', str(tmp_path / 'run'), '--bits', '8', '--group', '16',
                        '--method', 'rtn', '--out', str(tmp_path / 'int8')]) == 0
  assert load(tmp_path / 'int8').tokenizer_path == str(tmp_path / 'int8' / 'tokenizer.model')
  # Training data is tokenized with gemini_mini's tokenizer: no stage starts from it yet.
  from gemini_mini.train import runs  # pylint: disable=import-outside-toplevel
  with pytest.raises(CheckpointError, match='reads text with its own tokenizer.model'):
    runs.load_frozen(str(tmp_path / 'run'), None, key='train.teacher')


def test_an_import_without_its_tokenizer_is_refused_when_text_is_read(imported):
  # gemini_mini's own 8192 ids do not fit a 256-row vocabulary.
  with pytest.raises(TokenizerError, match="put the checkpoint's tokenizer.model in its run"):
    load(imported['mixtral_tiny']).tokenizer
