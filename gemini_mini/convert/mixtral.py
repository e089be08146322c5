"""The Mixtral format (``MixtralForCausalLM``) against gemini_mini's decoder: config fields and
tensors, both ways.

The two models compute the same function once four conventions agree: SwiGLU experts
(``model.activation: silu``), Mixtral's RMSNorm epsilon (``model.norm_eps``), top-k weights
renormalised even at k = 1 (``model.renormalize_top_k: always``) and an unscaled tied head
(``model.scale_tied_logits: false``, for checkpoints that tie). Everything else lines up:
pre-norm blocks, RoPE on rotated halves with ``rope_theta`` as the longest wavelength, query
heads grouped over key/value heads in the same order, a float32 softmax router.

Tensors (``L`` a layer, ``e`` an expert; Hugging Face stores ``[out, in]``):

    model.embed_tokens.weight [V, D]                     text.embedding_VD
    lm_head.weight [V, D] (absent when tied)             text.unembedding_DV (transposed)
    model.norm.weight [D]                                final_norm.scale_D
    model.layers.L.input_layernorm.weight                blocks.L.attention_norm.scale_D
    model.layers.L.post_attention_layernorm.weight       blocks.L.ffn_norm.scale_D
    model.layers.L.self_attn.{q,k,v}_proj.weight         blocks.L.attention.{q_DNH,k_DKH,v_DKH}
    model.layers.L.self_attn.o_proj.weight [D, N*H]      blocks.L.attention.o_NHD
    model.layers.L.block_sparse_moe.gate.weight [E, D]   blocks.L.ffn.router.w_DE
    ...block_sparse_moe.experts.e.w1 / w3 / w2.weight    blocks.L.ffn.gate_EDF / up_EDF / down_EFD [e]

transformers 5 may also save the fused layout (``model.layers.L.mlp.gate.weight``,
``mlp.experts.gate_up_proj [E, 2F, D]``, ``mlp.experts.down_proj [E, D, F]``); it is read too.
The image and audio encoders have no Mixtral counterpart: an import initialises them, an
export leaves them out.
"""

import dataclasses

import numpy as np

from gemini_mini.config import ModelConfig
from gemini_mini.convert.hf_files import HFCheckpoint, HFFormatError

ARCHITECTURE = 'MixtralForCausalLM'


class NotExpressible(ValueError):
  """A gemini_mini model that the Mixtral format cannot represent; names the option."""


# ---------------------------------------------------------------------------------- config

def model_fields(hf: dict) -> dict:
  """The ``model.*`` fields of a Hugging Face Mixtral ``config.json``.

  Raises:
    HFFormatError: another architecture, a missing key, or a feature gemini_mini lacks
      (another activation, RoPE scaling, attention biases), each named.
  """
  architectures = hf.get('architectures') or [hf.get('model_type', '?')]
  if ARCHITECTURE not in architectures and hf.get('model_type') != 'mixtral':
    raise HFFormatError(f'config.json: architectures {architectures}: gemini_mini converts '
                        f'{ARCHITECTURE} checkpoints only')

  def need(key):
    if key not in hf:
      raise HFFormatError(f'config.json: no "{key}"; a {ARCHITECTURE} config has it')
    return hf[key]

  refuse = {
      'hidden_act': (hf.get('hidden_act', 'silu') != 'silu', 'experts gated by SiLU'),
      'rope_scaling': (bool(hf.get('rope_scaling')) or (hf.get('rope_parameters') or {}).get(
          'rope_type', 'default') != 'default', 'plain RoPE (no scaling)'),
      'attention_bias': (bool(hf.get('attention_bias')), 'attention without biases'),
  }
  for key, (unsupported, supported) in refuse.items():
    if unsupported:
      raise HFFormatError(f'config.json: "{key}" is {hf.get(key)!r}; gemini_mini supports '
                          f'{supported} only')
  hidden, heads = need('hidden_size'), need('num_attention_heads')
  theta = hf.get('rope_theta', (hf.get('rope_parameters') or {}).get('rope_theta', 1e6))
  window = hf.get('sliding_window') or 0
  return dict(
      vocab_size=need('vocab_size'), d_model=hidden, num_layers=need('num_hidden_layers'),
      num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hidden // heads, d_ff=need('intermediate_size'),
      num_experts=need('num_local_experts'), experts_per_token=need('num_experts_per_tok'),
      moe_every=1, shared_expert=False, tie_embeddings=bool(hf.get('tie_word_embeddings')),
      scale_tied_logits=False, renormalize_top_k='always', activation='silu',
      norm_eps=float(hf.get('rms_norm_eps', 1e-5)), rope_max_wavelength=float(theta),
      attention_window=int(window), max_length=int(hf.get('max_position_embeddings', 8192)),
      scalar_head=False)


def hf_config(model: ModelConfig) -> dict:
  """The Hugging Face ``config.json`` of ``model``.

  A tied head scaled by ``d_model ** -0.5`` (gemini_mini's default) is exported untied, as
  the scaled table: the same function (bit for bit when ``d_model`` is a power of 4).

  Raises:
    NotExpressible: naming each option the Mixtral format cannot express.
  """
  problems = []
  if not model.num_experts:
    problems.append('model.num_experts: 0 (a dense model); Mixtral routes every layer')
  if model.num_experts and model.moe_every != 1:
    problems.append(f'model.moe_every: {model.moe_every}; Mixtral has experts in every layer')
  if model.shared_expert:
    problems.append('model.shared_expert: true; Mixtral has no shared expert')
  if model.activation != 'silu':
    problems.append(f'model.activation: {model.activation}; Mixtral gates with silu')
  renormalizes = model.renormalize_top_k == 'always' or (
      model.renormalize_top_k == 'when_k_above_1' and model.experts_per_token > 1)
  if not renormalizes:
    problems.append(f'model.renormalize_top_k: {model.renormalize_top_k} with '
                    f'experts_per_token {model.experts_per_token}; Mixtral renormalises the '
                    'top-k weights')
  if model.scalar_head:
    problems.append('model.scalar_head: true; a causal LM has no scalar head')
  if problems:
    raise NotExpressible('the Mixtral format cannot express: ' + '; '.join(problems))
  tied = model.tie_embeddings and not model.scale_tied_logits
  return {
      'architectures': [ARCHITECTURE], 'model_type': 'mixtral',
      'vocab_size': model.vocab_size, 'hidden_size': model.d_model,
      'intermediate_size': model.d_ff, 'num_hidden_layers': model.num_layers,
      'num_attention_heads': model.num_heads, 'num_key_value_heads': model.num_kv_heads,
      'head_dim': model.head_dim, 'num_local_experts': model.num_experts,
      'num_experts_per_tok': model.experts_per_token, 'hidden_act': 'silu',
      'rms_norm_eps': model.norm_eps, 'rope_theta': model.rope_max_wavelength,
      'max_position_embeddings': model.max_length,
      'sliding_window': model.attention_window or None, 'tie_word_embeddings': tied,
      'attention_dropout': 0.0, 'router_jitter_noise': 0.0, 'torch_dtype': 'float32',
      'output_router_logits': False, 'use_cache': True,
  }


# --------------------------------------------------------------------------------- tensors

@dataclasses.dataclass(frozen=True)
class Tensor:
  """One decoder parameter (``path`` in the unscanned decoder's state) and the hub-layout
  tensors that hold it (``names``, with their ``shapes``).

  ``assemble(fetch, index)`` builds the parameter's ``[index]`` slice from ``fetch(name)``,
  fetching only the tensors the slice needs; ``split(array)`` gives the tensors back, in the
  order of ``names``.
  """

  path: tuple
  names: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  assemble: object
  split: object


def _plain(path, name, shape, to_ours, to_hf) -> Tensor:
  return Tensor(path, (name,), (shape,),
                lambda fetch, index: np.asarray(to_ours(fetch(name)))[index],
                lambda array: [np.asarray(to_hf(array))])


def _stack(path, names, shape) -> Tensor:
  """An expert stack: expert e's ``[out, in]`` tensor, transposed, at index e."""
  def assemble(fetch, index):
    chosen = range(len(names))[index[0]]
    return np.stack([fetch(names[e]).T for e in chosen])[(slice(None),) + tuple(index[1:])]
  return Tensor(path, tuple(names), (shape,) * len(names), assemble,
                lambda array: [array[e].T for e in range(len(names))])


def tensors(model: ModelConfig) -> list[Tensor]:
  """Every decoder parameter the Mixtral format holds, in Hugging Face's order."""
  d, f, e = model.d_model, model.d_ff, model.num_experts
  n, k, h, v = model.num_heads, model.num_kv_heads, model.head_dim, model.vocab_size
  same = lambda a: a
  out = [_plain(('text', 'embedding_VD'), 'model.embed_tokens.weight', (v, d), same, same)]
  for i in range(model.num_layers):
    layer, block = f'model.layers.{i}', ('blocks', i)
    for name, ours, heads in (('q', 'q_DNH', n), ('k', 'k_DKH', k), ('v', 'v_DKH', k)):
      out.append(_plain(block + ('attention', ours), f'{layer}.self_attn.{name}_proj.weight',
                        (heads * h, d), lambda w, heads=heads: w.T.reshape(d, heads, h),
                        lambda a: a.reshape(d, -1).T))
    out.append(_plain(block + ('attention', 'o_NHD'), f'{layer}.self_attn.o_proj.weight',
                      (d, n * h), lambda w: w.T.reshape(n, h, d),
                      lambda a: a.reshape(n * h, d).T))
    for norm, name in (('attention_norm', 'input_layernorm'),
                       ('ffn_norm', 'post_attention_layernorm')):
      out.append(_plain(block + (norm, 'scale_D'), f'{layer}.{name}.weight', (d,), same, same))
    moe = f'{layer}.block_sparse_moe'
    out.append(_plain(block + ('ffn', 'router', 'w_DE'), f'{moe}.gate.weight', (e, d),
                      np.transpose, np.transpose))
    for ours, which, shape in (('gate_EDF', 'w1', (f, d)), ('up_EDF', 'w3', (f, d)),
                               ('down_EFD', 'w2', (d, f))):
      out.append(_stack(block + ('ffn', ours),
                        [f'{moe}.experts.{x}.{which}.weight' for x in range(e)], shape))
  out.append(_plain(('final_norm', 'scale_D'), 'model.norm.weight', (d,), same, same))
  if not model.tie_embeddings:
    out.append(_plain(('text', 'unembedding_DV'), 'lm_head.weight', (v, d), np.transpose,
                      np.transpose))
  return out


class HubView:
  """An ``HFCheckpoint`` read in the hub layout whichever layout it holds: transformers 5's
  fused tensors (``mlp.gate.weight``, ``mlp.experts.gate_up_proj [E, 2F, D]``,
  ``mlp.experts.down_proj [E, D, F]``) appear under the hub names, each expert's part read
  alone."""

  def __init__(self, hf: HFCheckpoint):
    self.hf = hf
    self._fused = {}  # hub name -> (fused name, index into it)
    for name in hf.names:
      prefix, _, rest = name.partition('.mlp.')
      if rest == 'gate.weight':
        self._fused[f'{prefix}.block_sparse_moe.gate.weight'] = (name, ())
      elif rest in ('experts.gate_up_proj', 'experts.down_proj'):
        experts, rows = hf.shape(name)[:2]
        for x in range(experts):
          hub = f'{prefix}.block_sparse_moe.experts.{x}'
          if rest == 'experts.down_proj':
            self._fused[f'{hub}.w2.weight'] = (name, (x,))
          else:
            self._fused[f'{hub}.w1.weight'] = (name, (x, slice(0, rows // 2)))
            self._fused[f'{hub}.w3.weight'] = (name, (x, slice(rows // 2, rows)))

  def shape(self, name: str) -> tuple[int, ...] | None:
    """The tensor's shape, or None when the checkpoint lacks it."""
    if name in self._fused:
      fused, index = self._fused[name]  # index: (), (expert,) or (expert, rows)
      shape = self.hf.shape(fused)[len(index[:1]):]
      return shape if len(index) < 2 else (index[1].stop - index[1].start, *shape[1:])
    return self.hf.shape(name) if name in self.hf.names else None

  def tensor(self, name: str) -> np.ndarray:
    if name in self._fused:
      fused, index = self._fused[name]
      return self.hf.tensor(fused, index or ...)
    return self.hf.tensor(name)


def check(view: HubView, model: ModelConfig) -> None:
  """Raises ``HFFormatError`` naming each missing tensor and each wrong shape (up to a few
  of each), before anything is read."""
  missing, wrong = [], []
  for tensor in tensors(model):
    for name, shape in zip(tensor.names, tensor.shapes):
      found = view.shape(name)
      if found is None:
        missing.append(name)
      elif tuple(found) != shape:
        wrong.append(f'{name} is {list(found)}, config.json implies {list(shape)}')
  problems = ([f'missing {len(missing)} tensors: {", ".join(missing[:4])}'] if missing else []) + (
      [f'{len(wrong)} tensors of the wrong shape: {"; ".join(wrong[:4])}'] if wrong else [])
  if problems:
    raise HFFormatError(f'{view.hf.directory}: ' + '; '.join(problems) + '; the weights do not '
                        'match config.json: download the checkpoint again')
