"""The layer library: pure Flax NNX modules that take plain dimensions.

Dimension key, used as shape suffixes (``x_BTD``) and as einsum letters
(``'BTKGH,BSKH->BKGTS'``) in the layers and the model; one meaning per letter:

  B  batch (sequences)             T  query length        S  key/value length
  D  model width (d_model)         N  query heads         K  key/value heads (1 = MQA)
  G  query heads per kv head (N = K*G)                    H  head dim
  F  feed-forward hidden (d_ff)    E  experts             R  routed slots per token (top-k)
  C  rows per expert of an expert buffer (capacity)       W  rows of an expert buffer
  V  vocabulary                    P  image patches       A  audio frames
  I, O  input and output width of a generic matmul (a patch or audio frame, an expert's)
  L  layers                        M  modalities (text, image, audio)
  Q  query rows of one KV head, G*T: dense attention folds the heads sharing a KV head into
     its query axis, one matmul per (batch, KV head)
  J  (batch, KV head) pairs, B*K batch major: the KV cache's leading axis
  X  tokens (or items) flattened into one axis, e.g. B*T: weight matmuls run on ``x_XD``
     (``layers.flatten_tokens``), which XLA:CPU differentiates about twice as fast
  n, c  blocks of a split axis and the positions in one block: the chunked attention's
        query and key chunks, the grouped matmul's tiles
  h  pairs of head dims that RoPE rotates (H / 2)
  U  replies packed in one row, each its own segment (``infer.score.reply_masks``)

Host-side signal code (``modalities/``, ``data/``) names its own axes in its docstrings
(image height and width, mel bins); they never meet the layers' tensors.

Every parameter carries logical axis names (``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``expert``, ``vocab``, ``features``); ``gemini_mini.parallel``
maps them onto mesh axes. Layers never see a config object or a mesh.
"""

from gemini_mini.layers.param import fan_in_init, flatten_tokens, param
from gemini_mini.layers.norm import RMSNorm
from gemini_mini.layers.rope import apply_rope, similar_token_reach
from gemini_mini.layers.attention import Attention, KVCache
from gemini_mini.layers.mlp import GatedMLP
from gemini_mini.layers.moe import MoE
from gemini_mini.layers.embed import FeatureEmbed, TokenEmbed
from gemini_mini.layers.scalar_head import ScalarHead

__all__ = [
    'Attention', 'FeatureEmbed', 'GatedMLP', 'KVCache', 'MoE', 'RMSNorm', 'ScalarHead', 'TokenEmbed',
    'apply_rope', 'fan_in_init', 'flatten_tokens', 'param', 'similar_token_reach',
]
