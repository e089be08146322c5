"""Host-side numpy, no jax: text (the tokenizer) so far; image, audio, video and the
interleaver (segments -> Batch) come next."""
