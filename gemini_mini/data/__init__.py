"""Real local data: sources, TFDS builders, the training tasks and the resumable mixture.

``python -m gemini_mini.data.prepare [--subset small]`` builds the datasets; ``tasks``
turns their records into examples; ``mixture.Mixture`` packs a weighted mix of them into
``gemini_mini.Batch``es.
"""
