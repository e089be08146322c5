"""Real local data: sources, the TFDS text corpus, packing and the resumable iterator.

``python -m gemini_mini.data.prepare [--subset small]`` builds the datasets;
``TextBatches`` reads them as ``gemini_mini.Batch``es.
"""
