"""Width pruning (``train.student_init: pruned``): the student starts as the teacher cut to its
widths, keeping the channels, heads and neurons that carry the most energy. Checked against
teachers whose dropped slices provably add nothing (the student then computes the teacher's
logits), against energies computed directly from the rows, and against slices taken by
loops."""

import dataclasses
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from gemini_mini import config as config_lib
from gemini_mini import parallel
from gemini_mini.config import ConfigError
from gemini_mini.model import Decoder
from gemini_mini.quant.calibrate import hessians
from gemini_mini.quant.model import variables
from gemini_mini.train import loop, prune
from helpers import make_batch
from test_distill import student as student_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEACHER = config_lib.load(ROOT / 'configs/test.yaml').model  # dense block 0, MoE block 1
DEAD_HEADS = {0: (1, 2), 1: (0, 3)}  # per block: one head under each KV head of two


def decoders(num_kv_heads=1, **student_widths):
  teacher = dataclasses.replace(TEACHER, num_kv_heads=num_kv_heads)
  student = dataclasses.replace(teacher, **student_widths)
  return Decoder(teacher, rngs=nnx.Rngs(0)), Decoder(student, rngs=nnx.Rngs(1))


def batch_with_every_modality(config, seed):
  return make_batch(config, length=64, num_patches=8, num_audio=8, images=((0, 4, 8),),
                    audio=((1, 10, 8),), seed=seed)


def kill(decoder, name, index, axis):
  """Zeroes ``index`` of parameter ``name`` along ``axis`` (a slice that then adds nothing)."""
  variable = variables(decoder)[name]
  value = np.array(variable[...])
  np.moveaxis(value, axis, 0)[index] = 0
  variable.set_value(jax.numpy.asarray(value))


@pytest.mark.parametrize('num_kv_heads', [1, 2])
def test_dropping_heads_and_neurons_that_add_nothing_keeps_the_teachers_logits(num_kv_heads):
  teacher, student = decoders(num_kv_heads, num_heads=2, d_ff=64)
  rng = np.random.default_rng(0)
  dead = {}  # module -> the neurons killed (per expert for the MoE)
  for block, heads in DEAD_HEADS.items():
    kill(teacher, f'blocks.{block}.attention.o_NHD', list(heads), 0)
  for module in ('blocks.0.ffn', 'image.mlp', 'audio.mlp'):
    dead[module] = rng.permutation(128)[:64]
    kill(teacher, f'{module}.down_FD', dead[module], 0)
  experts = variables(teacher)['blocks.1.ffn.down_EFD']
  value = np.array(experts[...])
  dead['blocks.1.ffn'] = np.stack([rng.permutation(128)[:64] for _ in range(4)])
  for e, neurons in enumerate(dead['blocks.1.ffn']):
    value[e, neurons] = 0
  experts.set_value(jax.numpy.asarray(value))

  calibration = [batch_with_every_modality(TEACHER, seed=1)]
  keep = prune.kept_slices(teacher, student.config, hessians(teacher, calibration))
  for block, heads in DEAD_HEADS.items():
    np.testing.assert_array_equal(keep[f'blocks.{block}.attention']['heads'],
                                  sorted(set(range(4)) - set(heads)))
  for module, neurons in dead.items():
    kept = keep[module]['mlp']
    for row, dropped in zip(kept.reshape(-1, 64), neurons.reshape(-1, 64)):
      np.testing.assert_array_equal(row, sorted(set(range(128)) - set(dropped)))

  params = prune.pruned_params(student, teacher, calibration)
  held_out = batch_with_every_modality(TEACHER, seed=2)
  np.testing.assert_allclose(nnx.merge(nnx.graphdef(student), params)(held_out)[0],
                             teacher(held_out)[0], atol=2e-5, rtol=1e-5)


def test_embed_channels_no_block_reads_are_dropped_and_every_weight_is_cut_along_its_axes():
  teacher, student = decoders(d_model=48, num_heads=2, d_ff=64)
  unread = np.random.default_rng(0).permutation(64)[:16]
  for block in (0, 1):
    for norm in ('attention_norm', 'ffn_norm'):
      kill(teacher, f'blocks.{block}.{norm}.scale_D', unread, 0)
  calibration = [batch_with_every_modality(TEACHER, seed=1)]
  keep = prune.kept_slices(teacher, student.config, hessians(teacher, calibration))
  kept = np.array(sorted(set(range(64)) - set(unread)))
  np.testing.assert_array_equal(keep['embed'], kept)

  ours = {name: np.asarray(v[...]) for name, v in variables(
      nnx.merge(nnx.graphdef(student), prune.pruned_params(student, teacher, calibration))).items()}
  theirs = {name: np.asarray(v[...]) for name, v in variables(teacher).items()}
  heads, neurons = keep['blocks.1.attention']['heads'], keep['blocks.1.ffn']['mlp']
  np.testing.assert_array_equal(ours['text.embedding_VD'], theirs['text.embedding_VD'][:, kept])
  np.testing.assert_array_equal(ours['final_norm.scale_D'], theirs['final_norm.scale_D'][kept])
  np.testing.assert_array_equal(ours['image.proj_ID'], theirs['image.proj_ID'][:, kept])
  np.testing.assert_array_equal(ours['blocks.1.ffn.router.w_DE'],
                                theirs['blocks.1.ffn.router.w_DE'][kept])
  np.testing.assert_array_equal(ours['blocks.1.attention.k_DKH'],
                                theirs['blocks.1.attention.k_DKH'][kept])
  for i, n in enumerate(heads):
    for j, d in enumerate(kept):
      np.testing.assert_array_equal(ours['blocks.1.attention.q_DNH'][j, i],
                                    theirs['blocks.1.attention.q_DNH'][d, n])
      np.testing.assert_array_equal(ours['blocks.1.attention.o_NHD'][i, :, j],
                                    theirs['blocks.1.attention.o_NHD'][n, :, d])
  for e in range(4):
    for i, f in enumerate(neurons[e]):
      np.testing.assert_array_equal(ours['blocks.1.ffn.gate_EDF'][e, :, i],
                                    theirs['blocks.1.ffn.gate_EDF'][e, kept, f])
      np.testing.assert_array_equal(ours['blocks.1.ffn.down_EFD'][e, i],
                                    theirs['blocks.1.ffn.down_EFD'][e, f, kept])


def test_heads_and_neurons_are_ranked_by_the_energy_they_add_to_the_residual_stream():
  rng = np.random.default_rng(0)
  a_XNH = rng.normal(size=(200, 4, 8)) * rng.uniform(0.2, 2.0, size=(1, 4, 8))
  o_NHD = rng.normal(size=(4, 8, 16))
  added_N = np.array([np.sum((a_XNH[:, n] @ o_NHD[n]) ** 2) for n in range(4)])
  hessian = a_XNH.reshape(200, -1).T @ a_XNH.reshape(200, -1)
  for kept, kv_heads in ((1, 1), (2, 1), (3, 1), (2, 2)):
    group = 4 // kv_heads
    expected = sorted(k * group + n for k in range(kv_heads)
                      for n in np.argsort(-added_N[k * group:(k + 1) * group])[:kept // kv_heads])
    np.testing.assert_array_equal(prune._heads(o_NHD, hessian, kept, kv_heads), expected)

  h_XF = rng.normal(size=(200, 32)) * rng.uniform(0.1, 3.0, size=32)
  down_FD = rng.normal(size=(32, 16)) * rng.uniform(0.1, 3.0, size=(32, 1))
  added_F = np.array([np.sum(np.outer(h_XF[:, f], down_FD[f]) ** 2) for f in range(32)])
  np.testing.assert_array_equal(prune._neurons(down_FD, h_XF.T @ h_XF, 12),
                                np.sort(np.argsort(-added_F)[:12]))


def test_a_student_that_differs_from_its_teacher_outside_the_widths_is_refused_naming_fields():
  with pytest.raises(ConfigError, match=r'train.student_init: .*model.num_layers=2 \(the '
                                        r"teacher's; this student has 3\)"):
    prune.check(dataclasses.replace(TEACHER, num_layers=3, moe_every=1), TEACHER)
  with pytest.raises(ConfigError, match=r'model.d_ff at most 128'):
    prune.check(dataclasses.replace(TEACHER, d_ff=256), TEACHER)
  with pytest.raises(ConfigError, match='train.student_init: only a train.stage=distill'):
    config_lib.load(ROOT / 'configs/test.yaml', ['train.student_init=pruned'])


def test_a_pruned_distill_run_starts_from_the_teachers_columns(small_data_dir, tiny_run_dir,
                                                                tmp_path):
  config = student_config(small_data_dir, tiny_run_dir, tmp_path / 'run',
                          'train.student_init=pruned')
  stage = loop.make_stage(config, parallel.make_mesh(config.mesh))
  table = np.asarray(stage.init_state().params['text']['embedding_VD'][...])
  teacher = np.asarray(stage.teacher.params['text']['embedding_VD'][...])
  matches = [np.flatnonzero((teacher == table[:, [j]]).all(0)) for j in range(table.shape[1])]
  assert all(len(m) == 1 for m in matches)
  columns = np.concatenate(matches)
  assert len(columns) == 32 and np.all(np.diff(columns) > 0)  # 32 of 64, in order
