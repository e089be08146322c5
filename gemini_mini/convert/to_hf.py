"""A gemini_mini run directory out to a Hugging Face Mixtral directory.

Written: ``config.json`` (``MixtralForCausalLM``), the weights in the hub layout as
safetensors shards (with an index when there are several) and the run's ``tokenizer.model``
if it has one. A model the format cannot represent is refused, naming each option
(``mixtral.hf_config``). The image and audio encoders have no place in the format and are
left out; the export is the text decoder.
"""

import dataclasses
import pathlib

import numpy as np
from flax import nnx

from gemini_mini.convert import hf_files, mixtral
from gemini_mini.infer.load import TOKENIZER, load
from gemini_mini.model import group_size
from gemini_mini.quant import checkpoint as quant_checkpoint

SHARD_BYTES = 2 ** 30


def convert(run_dir: str | pathlib.Path, out: str | pathlib.Path, *,
            shard_bytes: int = SHARD_BYTES) -> list[str]:
  """Writes ``out`` from the latest checkpoint of ``run_dir``; returns notes for the user
  (what was left out or changed in form).

  Raises:
    NotExpressible: an option the Mixtral format lacks.
    CheckpointError, HFFormatError: an unusable run directory or an existing ``out``.
  """
  if quant_checkpoint.is_quantized(run_dir):
    raise mixtral.NotExpressible(f'{run_dir} is quantized; export the float run it came from')
  loaded = load(run_dir)
  model = loaded.config.model
  notes = ['left out the image and audio encoders (text-only format)']
  params = nnx.to_pure_dict(nnx.state(loaded.decoder, nnx.Param))
  export = model
  if model.tie_embeddings and model.scale_tied_logits:  # the scaled table as an untied head
    export = dataclasses.replace(model, tie_embeddings=False)
    table = np.asarray(params['text']['embedding_VD'])
    params['text']['unembedding_DV'] = (table * np.float32(model.d_model ** -0.5)).T
    notes.append('wrote the tied, scaled output layer as an untied lm_head (the same logits)')
  config = mixtral.hf_config(export)

  def pairs():
    for tensor in mixtral.tensors(export):
      yield from zip(tensor.names, tensor.split(np.asarray(_at(params, tensor.path, model))))

  run_tokenizer = pathlib.Path(run_dir) / TOKENIZER
  hf_files.write(out, config, pairs(), shard_bytes=shard_bytes,
                 extra_files=(run_tokenizer,) if run_tokenizer.is_file() else ())
  return notes


def _at(params: dict, path: tuple, model) -> np.ndarray:
  """The parameter at an unscanned ``path`` (``('blocks', 3, 'attention', 'q_DNH')``), read
  from a scanned decoder's stacked groups when the run scans its layers."""
  if path[0] == 'blocks' and model.scan_layers:
    group, within = divmod(path[1], group_size(model))
    node = params['groups']['blocks'][within]
    for key in path[2:]:
      node = node[key]
    return np.asarray(node)[group]
  node = params
  for key in path:
    node = node[key]
  return np.asarray(node)
