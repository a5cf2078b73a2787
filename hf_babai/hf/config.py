"""``BabaiConfig``: the ``quantization_config`` a user passes to ``from_pretrained``.

It carries two kinds of fields:

- **format and solver fields** (``bits``, ``group_size``, ``sym``, ``order``, ...) that are written to
  ``config.json`` and read back when the checkpoint is loaded;
- **calibration inputs** (``dataset``, ``tokenizer``) that are only needed while quantizing. They are never
  serialised: a list of texts or a tokenizer object in ``config.json`` would be large, unreproducible and
  sometimes private. ``to_dict`` writes a small ``calibration`` descriptor instead (source, sample count,
  sequence length, token count, a hash of the token ids) so a checkpoint still says what it was calibrated on.

Every field is validated in :meth:`BabaiConfig.post_init`, with a message naming the field, the bad value and
the allowed values.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..engine import ENGINE_SCALE_METHODS as SCALE_METHODS
from ..engine import FORMATS, METHODS, QuantSpec, default_scale_method
from ..solver import DAMP_WIDTH
from ..solver.grid import SUPPORTED_BITS
from ..solver.ordering import ORDERS

QUANT_METHOD = "babai"
FORMAT_VERSION = 1
BUILTIN_DATASETS = ("austen",)


class BabaiConfig(QuantizationConfigMixin):
    """Quantization settings for hf_babai (``quant_method="babai"``).

    Args:
        bits: code width, one of 2, 3, 4, 8.
        group_size: input columns per scale; ``-1`` = one scale per output channel.
        sym: symmetric grid (no stored zero points) if True.
        order: Babai order: ``"act-order"`` (default; best measured, see the README benchmarks), ``"min-pivot"``
            (the paper's pivoted LDL) or ``"natural"``.
        method: ``"babai"`` (nearest-plane with calibration) or ``"rtn"`` (round to nearest, no data).
        scale_method: ``"mse"`` (shrink search on the weights alone, GPTQ's), ``"hmse"`` (the same search weighted
            by each input's ``diag H``; needs ``method="babai"``), ``"auto"`` (``"mse"``, and per layer where that
            solve's error exceeds Babai's no-clipping bound a second solve with ``"hmse"`` + refit, the lower proxy
            loss kept), ``"best"`` (``"auto"``'s two solves on every layer, the lower loss kept;
            about twice the solve time) or ``"minmax"``. Default: ``"auto"`` for ``method="babai"`` with
            ``format="int"`` at 3 bits or more, else ``"mse"`` (``engine.default_scale_method`` says why, with
            the README measurements).
        rescale: after the solve, refit each group's scale to its codes under ``H`` (closed-form least squares,
            kept per row only where it lowers the loss); ``format="int"``, ``method="babai"`` only; off by default
            (``"auto"`` refits its second solve regardless).
        refine_sweeps: coordinate-descent sweeps on the codes after the solve (a closest-vector step beyond
            Babai; each costs about one solve); ``format="int"``, ``method="babai"`` only.
        damp: Hessian damping as a fraction of its mean diagonal (escalated ×10 until it factors); the floor.
        damp_width: damping that grows with the layer's width per calibration token: each layer uses
            ``max(damp, damp_width · in_features / tokens)`` (``hf_babai.solver.layer_damp`` says why; default
            1/3, which changes only layers wider than ``0.03 × tokens``, e.g. a 4864-wide ``down_proj`` at
            16k tokens gets 0.1). ``0`` gives GPTQ's fixed ``damp``.
        block_size: lazy-batch block width of the solver.
        modules_to_not_convert: substrings of full module names to keep in full precision; ``lm_head`` and
            embeddings are never quantized (only Linears inside the decoder blocks are).
        dataset: calibration data: a list of texts (joined, cut into random windows), ``"austen"`` (the
            offline Austen novels of :mod:`hf_babai.assets`), a ``[n, T]`` tensor of token ids, or a list of
            ``{"input_ids", "attention_mask"}`` dicts. Not saved.
        tokenizer: tokenizer object or path for text datasets (default: the model's own). Not saved.
        nsamples, seqlen: calibration windows cut from text datasets.
        batch_size: calibration samples per forward; ``None`` = all at once (``true_sequential`` needs that).
        true_sequential: quantize each sub-layer inside one forward per block, so ``o_proj``/``down_proj`` see
            Hessians of already-quantized upstream outputs (GPTQ's option of that name; saves one forward per
            block). ``False``: Hessians from the block's float weights, then a propagation pass (llm-compressor's
            schedule). Default ``None`` (auto): one pass for the int format at ≥ 3 bits with all samples in one
            forward (measured as good there, and faster), two passes otherwise (far better at 2 bits; README).
        calibration: descriptor of the calibration data, filled in when quantizing (read back from checkpoints).
        format: ``"int"`` (``bits``-bit codes with group scales, GPTQ-compatible) or ``"hptq"`` (one scale per
            matrix, unbounded codes entropy-coded to ``target_bpw`` stored bits per weight; ``bits``,
            ``group_size``, ``sym`` and ``scale_method`` do not apply). ``method="rtn"`` with ``"hptq"`` is HRTN.
            ``"ssqr"``: ``bits``-bit group-scaled inliers plus sparse exact outliers (no clipping), scales
            tuned per layer so at most ``outlier_rate`` of the weights are outliers.
        target_bpw: ``"hptq"`` only: bits per weight to meet, codebook, offsets and scale included (e.g. 3.125).
        outlier_rate: ``"ssqr"`` only: fraction of weights stored as sparse outliers (e.g. 0.01).
        layers: ``"hptq"``/``"ssqr"`` only, filled in when quantizing: each module's buffer sizes, which depend
            on the data and must be known to allocate the modules before a checkpoint's tensors are read.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        order: str = "act-order",
        method: str = "babai",
        scale_method: str | None = None,
        damp: float = 0.01,
        damp_width: float = DAMP_WIDTH,
        block_size: int = 128,
        modules_to_not_convert: list[str] | None = None,
        dataset: Any = None,
        tokenizer: Any = None,
        nsamples: int = 128,
        seqlen: int = 512,
        batch_size: int | None = None,
        calibration: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        format: str = "int",
        target_bpw: float | None = None,
        layers: dict[str, dict[str, int]] | None = None,
        outlier_rate: float | None = None,
        rescale: bool | None = None,
        refine_sweeps: int = 0,
        true_sequential: bool | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(
                f"BabaiConfig got unknown fields {sorted(kwargs)}; allowed: bits, group_size, sym, order, method, "
                "scale_method, damp, damp_width, block_size, modules_to_not_convert, dataset, tokenizer, nsamples, "
                "seqlen, batch_size, calibration, format_version, format, target_bpw, layers, outlier_rate, rescale, "
                "refine_sweeps, true_sequential"
            )
        self.quant_method = QUANT_METHOD
        # resolved here so config.json records what was used (bad bits/method/format are reported by post_init)
        if scale_method is None:
            scale_method = default_scale_method(method, format, bits)
        if rescale is None:
            rescale = False
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.order = order
        self.method = method
        self.scale_method = scale_method
        self.damp = damp
        self.damp_width = damp_width
        self.block_size = block_size
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.nsamples = nsamples
        self.seqlen = seqlen
        self.batch_size = batch_size
        self.calibration = calibration
        self.format_version = format_version
        self.format = format
        self.target_bpw = target_bpw
        self.layers = layers
        self.outlier_rate = outlier_rate
        self.rescale = rescale
        self.refine_sweeps = refine_sweeps
        self.true_sequential = true_sequential
        self.post_init()

    def post_init(self) -> None:
        """Validates every field; the message names the field, the value and what is allowed."""

        def bad(field: str, allowed: str) -> ValueError:
            return ValueError(f"BabaiConfig: {field}={getattr(self, field)!r} is invalid; {allowed}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.bits not in SUPPORTED_BITS or not is_int(self.bits):
            raise bad("bits", f"use one of {SUPPORTED_BITS}")
        if not is_int(self.group_size) or not (self.group_size == -1 or self.group_size >= 1):
            raise bad("group_size", "use a positive int (e.g. 32, 64, 128) or -1 for one scale per output channel")
        if not isinstance(self.sym, bool):
            raise bad("sym", "use True or False")
        if self.order not in ORDERS:
            raise bad("order", f"use one of {ORDERS}")
        if self.method not in METHODS:
            raise bad("method", f"use one of {METHODS}")
        if self.scale_method not in SCALE_METHODS:
            raise bad("scale_method", f"use one of {SCALE_METHODS}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise bad("damp", "use a float in [0, 1) (fraction of the Hessian's mean diagonal), e.g. 0.01")
        dw = self.damp_width
        if isinstance(dw, bool) or not isinstance(dw, (int, float)) or not 0 <= dw < float("inf"):
            raise bad("damp_width", "use a float >= 0 (damping per input feature per calibration token, 0 = off)")
        if not is_int(self.block_size) or self.block_size < 1:
            raise bad("block_size", "use a positive int, e.g. 128")
        if self.modules_to_not_convert is not None and not all(isinstance(m, str) for m in self.modules_to_not_convert):
            raise bad("modules_to_not_convert", "use a list of module-name substrings, e.g. ['mlp.down_proj']")
        if not is_int(self.nsamples) or self.nsamples < 1:
            raise bad("nsamples", "use a positive int (calibration windows), e.g. 128")
        if not is_int(self.seqlen) or self.seqlen < 2:
            raise bad("seqlen", "use an int >= 2 (tokens per calibration window), e.g. 512")
        if self.batch_size is not None and (not is_int(self.batch_size) or self.batch_size < 1):
            raise bad("batch_size", "use None (all samples in one forward) or a positive int")
        if self.true_sequential is not None and not isinstance(self.true_sequential, bool):
            raise bad("true_sequential", "use True (one pass per block), False (two passes) or None (auto)")
        if self.true_sequential and self.batch_size is not None:
            raise ValueError(
                "BabaiConfig: true_sequential=True quantizes inside one forward of all calibration samples; "
                f"batch_size={self.batch_size} splits them: unset batch_size or use true_sequential=False"
            )
        if self.format_version != FORMAT_VERSION:
            raise bad("format_version", f"this hf_babai reads format_version {FORMAT_VERSION}; upgrade hf_babai")
        if self.format not in FORMATS:
            raise bad("format", f"use one of {FORMATS}")
        if self.format == "hptq":
            t = self.target_bpw
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 1 <= t <= 16:
                raise bad("target_bpw", "format='hptq' needs the stored bits per weight to meet, e.g. 3.125")
        elif self.target_bpw is not None:
            raise ValueError("BabaiConfig: target_bpw applies to format='hptq' only; leave it unset")
        if self.format == "ssqr":
            r = self.outlier_rate
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
                raise bad("outlier_rate", "format='ssqr' needs the fraction of sparse outliers in [0, 1), e.g. 0.01")
            if self.method != "babai":
                raise bad("method", "format='ssqr' tunes its scales on the Babai solve: use method='babai'")
        elif self.outlier_rate is not None:
            raise ValueError("BabaiConfig: outlier_rate applies to format='ssqr' only; leave it unset")
        if self.scale_method in ("hmse", "best", "auto") and self.method != "babai":
            raise bad("scale_method", f"{self.scale_method!r} uses diag H, which method='rtn' has not: use 'mse'")
        if self.scale_method in ("best", "auto") and self.format != "int":
            raise bad("scale_method", f"{self.scale_method!r} (a second solve, lower loss kept) is for format='int'")
        if not isinstance(self.rescale, bool):
            raise bad("rescale", "use True or False")
        if not is_int(self.refine_sweeps) or self.refine_sweeps < 0:
            raise bad("refine_sweeps", "use an int >= 0 (coordinate-descent sweeps after the solve), e.g. 1")
        if (self.rescale or self.refine_sweeps) and (self.format != "int" or self.method != "babai"):
            raise ValueError(
                "BabaiConfig: rescale/refine_sweeps refine a Babai solve of format='int'; "
                f"unset them for format={self.format!r}, method={self.method!r}"
            )
        if self.format == "int" and self.layers is not None:
            raise ValueError("BabaiConfig: layers (per-module buffer sizes) apply to format='hptq'/'ssqr' only")
        if isinstance(self.dataset, str) and self.dataset not in BUILTIN_DATASETS:
            raise bad(
                "dataset",
                f"strings name built-in datasets {BUILTIN_DATASETS}; pass your texts as a list of strings "
                "(hf_babai downloads nothing from the Hub)",
            )

    @property
    def skip(self) -> tuple[str, ...]:
        """Module-name substrings left in full precision."""
        return ("lm_head", *(self.modules_to_not_convert or ()))

    def spec(self) -> QuantSpec:
        """The engine's settings for this config."""
        return QuantSpec(
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            method=self.method,
            order=self.order,
            scale_method=self.scale_method,
            damp=float(self.damp),
            damp_width=float(self.damp_width),
            block_size=self.block_size,
            skip=self.skip,
            format=self.format,
            target_bpw=None if self.target_bpw is None else float(self.target_bpw),
            outlier_rate=None if self.outlier_rate is None else float(self.outlier_rate),
            rescale=self.rescale,
            refine_sweeps=self.refine_sweeps,
            true_sequential=self.true_sequential,
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to load the checkpoint; calibration objects are replaced by their descriptor."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in ("dataset", "tokenizer")}
        out["quant_method"] = QUANT_METHOD
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """Fields that differ from the defaults (``quant_method`` always kept)."""
        default = BabaiConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "quant_method" or default.get(k) != v}

    def __iter__(self):
        """``dict(cfg)`` gives the serialisable fields only, like :meth:`to_dict`."""
        yield from self.to_dict().items()

    def __repr__(self) -> str:
        return f"BabaiConfig {self.to_dict()}"


def describe_calibration(source: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, Any]:
    """The small, JSON-safe record of the calibration data that goes into ``config.json``."""
    tokens = int(attention_mask.sum()) if attention_mask is not None else int(input_ids.numel())
    digest = hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
    return {
        "source": source,
        "nsamples": int(input_ids.shape[0]),
        "seqlen": int(input_ids.shape[1]),
        "tokens": tokens,
        "ids_sha256": digest,
    }
