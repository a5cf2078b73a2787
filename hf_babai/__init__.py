"""hf_babai: post-training LLM weight quantization with Babai's nearest-plane algorithm.

GPTQ run back-to-front *is* Babai's nearest-plane algorithm on the lattice of the layer Hessian
(arXiv 2507.18553). This package implements that solver (``hf_babai.solver``), packed integer formats and
a quantized Linear (``hf_babai.formats``), a layer-by-layer engine for transformers decoders
(``hf_babai.engine``) and the transformers integration (``hf_babai.hf``): importing ``hf_babai`` registers
``quant_method="babai"`` so ``from_pretrained(..., quantization_config=BabaiConfig(...))`` quantizes on load
and babai checkpoints reload with plain ``from_pretrained(path)``. ``publish`` uploads a checkpoint with an
auto-generated model card; ``evaluate`` runs lm-eval on a model.
"""

__version__ = "0.1.0"

from .eval import evaluate
from .hf import BabaiConfig, BabaiHfQuantizer, BabaiQuantizer, CheckpointError, export, write_quant_log
from .hub import PublishError, build_card, publish

__all__ = [
    "BabaiConfig",
    "BabaiHfQuantizer",
    "BabaiQuantizer",
    "CheckpointError",
    "PublishError",
    "__version__",
    "build_card",
    "evaluate",
    "export",
    "publish",
    "write_quant_log",
]
