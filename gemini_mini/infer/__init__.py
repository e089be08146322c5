"""Inference: sampling from next-token logits (``sampling``) and batched generation from
interleaved text/image/audio prompts with a KV cache (``generate.generate``)."""
