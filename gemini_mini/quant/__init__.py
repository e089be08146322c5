"""Weight-only quantization of a trained decoder: int4 or int8 weights, float32 scales.

Every weight matmul's parameter (``layers.param(..., contract=...)`` names the axes it sums
over) becomes a ``qwix.QArray``: symmetric integers with one scale per group of ``group``
consecutive entries along those axes, flattened row-major. The embeddings (and the tied
output head), the router, the norms and the scalar head stay float32: they are small, or
their errors reach every token. A quantized ``Decoder`` is the float one with those values
replaced, so the model's forward pass, ``prefill`` and ``decode`` run unchanged.

  pack.py        two int4 values per byte, for the checkpoint
  rtn.py         round-to-nearest, and where a weight's scales go
  calibrate.py   the input Hessians ``sum x x^T`` of each weight's matmul, for GPTQ
  gptq.py        GPTQ (qwix's), error-compensating rounding driven by those Hessians
  model.py       quantizing every weight of a decoder
  checkpoint.py  the quantized checkpoint: a directory with the config and a safetensors file
"""
