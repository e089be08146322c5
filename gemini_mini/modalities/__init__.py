"""Host-side numpy, no jax: text (the SentencePiece tokenizer), image patches, 16 kHz audio
to log-mel frames, video as time-stamped 1 fps frames, and the interleaver that turns a list
of text/image/audio segments into rows of the batch contract."""
