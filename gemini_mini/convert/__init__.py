"""Hugging Face-format checkpoints in and out (``python -m gemini_mini.convert``).

``from_hf.convert`` reads a Mixtral directory into a run directory, ``to_hf.convert`` writes
one back; ``mixtral`` holds the correspondence of config fields and tensors, ``hf_files`` the
reading and writing of safetensors directories.
"""
