"""gemini_mini: a small, readable JAX/Flax NNX reimplementation of the Gemini 1.0/1.5
architecture (multi-query attention, top-k routed experts, interleaved text, image, audio
and video tokens)."""

from gemini_mini.batch import Batch, Modality

__all__ = ['Batch', 'Modality']
