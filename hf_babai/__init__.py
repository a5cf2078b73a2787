"""hf_babai: post-training LLM weight quantization with Babai's nearest-plane algorithm.

GPTQ run back-to-front *is* Babai's nearest-plane algorithm on the lattice of the layer Hessian
(arXiv 2507.18553). This package implements that solver (``hf_babai.solver``), packed integer formats and
a quantized Linear (``hf_babai.formats``), and a layer-by-layer engine for transformers decoders.
"""

__version__ = "0.1.0"
