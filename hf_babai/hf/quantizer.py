"""``BabaiHfQuantizer``: the transformers lifecycle around the engine.

transformers 5.17–5.23 call, in ``from_pretrained``: ``__init__`` → ``validate_environment`` →
``update_device_map`` → ``update_dtype`` → (model built on meta) ``_process_model_before_weight_loading`` →
weights load (accelerate may dispatch/offload) → ``_process_model_after_weight_loading``. Only these stable
hooks are implemented (plus ``_dequantize``, ``is_serializable``, ``is_trainable``).

- **Pre-quantized checkpoint**: before loading, every Linear the engine would quantize
  (:func:`hf_babai.engine.quantizable_linears`) becomes an empty module of the checkpoint's format (built by the
  format registry on the meta device), and the safetensors headers are checked against those modules.
  transformers initialises missing tensors randomly, so a missing, truncated or wrongly shaped tensor is refused
  here, by name.
- **Quantize on load**: after loading, the calibration windows go through the engine block by block. If
  accelerate offloaded blocks (CPU or disk), each is onloaded just before it is quantized and stays resident at
  quantized size.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer

from ..engine import (
    BlockStore,
    Ranks,
    expose_routers,
    find_blocks,
    linear_dims,
    quantizable_linears,
    quantize_model,
    replace_module,
    run_identity,
    unfuse_experts,
)
from ..formats import format_names, format_of, get_format, quantized_modules
from .calibration import MISSING_DATASET, calibration_batches
from .config import BabaiConfig

log = logging.getLogger(__name__)

_ST_DTYPES = {
    torch.int32: "I32",
    torch.int64: "I64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
}


class CheckpointError(ValueError):
    """A babai checkpoint that cannot be loaded faithfully (missing, truncated or mis-shaped tensors)."""


def replace_with_quantized_modules(model: nn.Module, cfg: BabaiConfig) -> dict[str, nn.Module]:
    """Swaps every quantizable ``nn.Linear`` for an empty module of ``cfg.format`` (sized from ``cfg.layers`` for
    formats sized by their data) on the Linear's own device (meta during ``from_pretrained``), with the Linear's
    dtype. Returns the new modules by name."""
    spec = cfg.spec()
    fmt = get_format(spec.format)
    unfuse_experts(model)  # MoE experts were quantized one Linear per expert matrix: rebuild that structure
    if spec.quantize_router:  # and so were the routers of the decoder blocks, each through a child Linear
        for block in find_blocks(model)[1]:
            expose_routers(block)
    linears = quantizable_linears(model, spec)
    if fmt.sized_by_data:
        missing = sorted(set(linears) - set(cfg.layers or {}))
        if missing:
            raise CheckpointError(
                f"format={fmt.name!r} checkpoint without buffer sizes for {len(missing)} modules (e.g. "
                f"{missing[0]}) in config.json quantization_config.layers; it was not written by hf_babai's "
                "quantizer: re-save it"
            )
    new: dict[str, nn.Module] = {}
    for name, lin in linears.items():
        sizes = cfg.layers[name] if fmt.sized_by_data else None
        common = {"bias": lin.bias is not None, "dtype": lin.weight.dtype, "device": lin.weight.device}
        new[name] = fmt.empty(*linear_dims(lin), spec, sizes, **common)
        replace_module(model, name, new[name])
    if not new:
        raise ValueError(
            "this model has no Linear layers that BabaiConfig would quantize; check modules_to_not_convert"
        )
    return new


def _read_headers(files: list[str]) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """``{tensor name: (shape, safetensors dtype, file)}`` over all shards; unreadable or truncated files raise."""
    from safetensors import safe_open

    out: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            raise CheckpointError(f"{f}: babai checkpoints are loaded from .safetensors files only")
        try:
            with safe_open(f, framework="pt") as sf:
                for k in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    sl = sf.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), sl.get_dtype(), f)
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(
                f"{f} cannot be read as safetensors ({e}); the file is truncated or corrupt: download or save it again"
            ) from e
    return out


def check_checkpoint(model: nn.Module, modules: dict[str, nn.Module], files: list[str] | None) -> None:
    """Refuses a checkpoint whose packed tensors do not match the modules they load into, before any loading.

    Checked: every tensor each module's format declares (and its bias) is present with the exact shape and dtype;
    no packed tensor is left without a module; and (for models whose checkpoint keys equal their state-dict
    keys) every other persistent tensor that is not tied is present."""
    if not files:
        return
    header = _as_loaded(model, _read_headers([str(f) for f in files]))
    problems: list[str] = []
    for name, mod in modules.items():
        specs = format_of(mod).tensors(mod)
        if mod.bias is not None:
            specs = {**specs, "bias": ((mod.out_features,), None)}
        for buf, (shape, dtype) in specs.items():
            key = f"{name}.{buf}"
            if key not in header:
                problems.append(f"{key} is missing")
                continue
            got_shape, got_dtype, f = header[key]
            if tuple(got_shape) != tuple(shape):
                problems.append(f"{key} has shape {list(got_shape)} in {Path(f).name}, expected {list(shape)}")
            elif dtype is not None and got_dtype != _ST_DTYPES.get(dtype):
                problems.append(f"{key} has dtype {got_dtype} in {Path(f).name}, expected {_ST_DTYPES.get(dtype)}")
    primary = {get_format(f).primary for f in format_names()}
    packed_keys = {k for k in header if k.rsplit(".", 1)[-1] in primary}
    for orphan in sorted(k for k in packed_keys if k.rsplit(".", 1)[0] not in modules):
        problems.append(f"{orphan} has no quantized module to load into (was it saved with other settings?)")
    problems += _missing_dense(model, header, set(modules))
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(
            f"this babai checkpoint does not match the model ({len(problems)} problems):\n  {shown}\n"
            "Loading it would leave randomly initialised weights. Re-save or re-download the checkpoint."
        )


def nonfinite_in_files(files: list[str]) -> list[str]:
    """Stored scales, codebooks and other float side tensors (every float tensor not named ``weight`` or ``bias``)
    that hold NaN or Inf, by name: such a checkpoint loads but produces NaN logits."""
    from safetensors import safe_open

    bad = []
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key.rsplit(".", 1)[-1] in ("weight", "bias") or sf.get_slice(key).get_dtype() not in _FLOAT_ST:
                    continue
                n = int((~torch.isfinite(sf.get_tensor(key))).sum())
                if n:
                    bad.append(f"{key} in {Path(f).name} has {n} NaN/Inf values")
    return bad


def check_finite(model: nn.Module) -> None:
    """Refuses a loaded model whose quantized modules hold NaN/Inf in a float tensor (scales, codebooks, bias)."""
    bad = []
    for name, mod, _ in quantized_modules(model):
        for leaf, t in [*mod.named_buffers(recurse=False), *mod.named_parameters(recurse=False)]:
            if t.is_floating_point() and t.device.type != "meta":
                n = int((~torch.isfinite(t)).sum())
                if n:
                    bad.append(f"{name}.{leaf} has {n} NaN/Inf values")
    if bad:
        raise CheckpointError(
            "this babai checkpoint stores non-finite values, so the model would produce NaN logits:\n  "
            + "\n  ".join(bad[:20])
            + "\nRe-save or re-download the checkpoint (or quantize the model again)."
        )


_FLOAT_ST = ("F16", "BF16", "F32", "F64")


def _as_loaded(model: nn.Module, header: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's tensors under the names they load into. transformers 5 renames keys between disk and memory
    for many architectures (GPT-NeoX's ``embed_out`` is ``lm_head`` in memory; vision-language models keep
    ``model.layers`` on disk for ``model.language_model.layers``); ``save_pretrained`` applies the reverse. The same
    conversion transformers loads with is applied here, so the check compares like with like. A key that several
    checkpoint tensors fuse into (a converter merging experts) appears once."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # pragma: no cover - transformers without key conversion: names are compared as they are
        return header
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    in_memory = dict.fromkeys(model.state_dict(), True)
    prefix = getattr(model, "base_model_prefix", None) or None
    out: dict[str, Any] = {}
    for key, value in header.items():
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, in_memory)
        out[renamed] = value
        if pattern is None:
            continue
        targets = next(c.target_patterns for c in converters if pattern in c.source_patterns)
        for other in targets[1:]:  # a split (fused q/k/v on disk, separate in memory): every part is present
            out[renamed.replace(targets[0], other)] = value
    return out


def _missing_dense(model: nn.Module, header: dict, quantized: set[str]) -> list[str]:
    """Non-quantized tensors absent from the checkpoint (``header`` already under in-memory names)."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    return [
        f"{k} is missing"
        for k in model.state_dict()
        if k not in header and k not in tied and k.rsplit(".", 1)[0] not in quantized  # those are checked above
    ]


def without_quantized_converters(conversions: list | None, model: nn.Module) -> list | None:
    """The model's key converters minus those that would rewrite a quantized module's tensors. transformers fuses or
    splits dense weights between disk and memory (a fused ``query_key_value`` split into q/k/v on load, concatenated
    again on save); applied to packed codes and scales that concatenation fails or corrupts them. Without the
    converter, those tensors are saved and loaded under their in-memory names, consistently both ways."""
    if not conversions:
        return conversions
    try:
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # pragma: no cover - transformers without key conversion
        return conversions
    keys = [f"{n}.{b}" for n, m, _ in quantized_modules(model) for b in m.packed_buffers()]
    if not keys:
        return conversions
    kept = []
    for conv in conversions:
        if isinstance(conv, WeightConverter):
            reverse = conv.reverse_transform()
            if any(reverse.rename_source_key(k)[1] is not None for k in keys):
                continue
        kept.append(conv)
    return kept


class BabaiHfQuantizer(HfQuantizer):
    """transformers quantizer for ``quant_method="babai"`` (see the module docstring for the lifecycle)."""

    requires_calibration = False
    quantization_config: BabaiConfig

    def __init__(self, quantization_config: BabaiConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.records: list = []
        self.saved_elsewhere: set[str] | None = None  # tensors save_pretrained leaves out (hf_babai.save_streamed)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        cfg = self.quantization_config
        if not self.pre_quantized and cfg.method == "babai" and cfg.dataset is None:
            raise ValueError(MISSING_DATASET)  # before any weights are loaded

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype | None:
        """Keeps the requested compute dtype (fp32/fp16/bf16); packed tensors keep their own dtypes."""
        return dtype

    update_torch_dtype = update_dtype  # name used by older transformers

    def update_weight_conversions(self, weight_conversions: list, model: nn.Module | None = None) -> list:
        """transformers' hook for the key conversions a load applies (and a later save reverses). transformers
        before 5.2x calls it without the model; then nothing is filtered here, and only the filter applied after
        quantizing (``_process_model_after_weight_loading``) protects the packed tensors."""
        parent = getattr(super(), "update_weight_conversions", None)
        if parent is not None:
            takes_model = len(inspect.signature(parent).parameters) >= 2
            weight_conversions = parent(weight_conversions, model) if takes_model else parent(weight_conversions)
        return weight_conversions if model is None else without_quantized_converters(weight_conversions, model)

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            modules = replace_with_quantized_modules(model, self.quantization_config)
            check_checkpoint(model, modules, kwargs.get("checkpoint_files"))
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if hasattr(model, "add_model_tags"):  # so even transformers' generic push_to_hub card says what this is
            model.add_model_tags(["hf_babai", "babai"])
        if self.pre_quantized:
            check_finite(model)
            return model
        cfg = self.quantization_config
        ids = mask = None
        start = time.perf_counter()
        if cfg.method == "babai":
            ids, mask, cfg.calibration = calibration_batches(cfg, model)
        model.eval()
        if cfg.method == "babai" and Ranks.current() is not None and cfg.true_sequential is None:
            cfg.true_sequential = False  # what a distributed run does (docs/distributed.md), recorded as such
        store = self._block_store(model, cfg, ids)
        self.records = quantize_model(model, cfg.spec(), ids, mask, batch_size=cfg.batch_size, store=store)
        if getattr(model, "_weight_conversions", None):  # what save_pretrained will reverse
            model._weight_conversions = without_quantized_converters(model._weight_conversions, model)
        fmt = get_format(cfg.format)
        if fmt.sized_by_data:  # the loader needs each module's sizes to allocate it before reading its tensors
            cfg.layers = {n: f.buffer_sizes(m) for n, m, f in quantized_modules(model)}
        log.info("hf_babai: quantized %d layers in %.1f s", len(self.records), time.perf_counter() - start)
        model.config.quantization_config = cfg
        return model

    @staticmethod
    def _block_store(model: nn.Module, cfg: BabaiConfig, ids: torch.Tensor | None) -> BlockStore | None:
        """The run folder (``cfg.run_dir``): written by rank 0 of a fresh run, read by every rank of a resumed one."""
        if cfg.run_dir is None:
            if cfg.resume:
                raise ValueError("BabaiConfig(resume=True) needs run_dir, the folder of the run to continue")
            return None
        ranks = Ranks.current()
        if ranks is not None and ranks.rank != 0 and not cfg.resume:
            return None
        identity = run_identity(model, cfg.spec(), ids, len(find_blocks(model)[1]))
        config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        return BlockStore(cfg.run_dir, identity, cfg.resume, config=config)

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """Every quantized module becomes an ``nn.Linear`` holding its dequantized weight."""
        for name, mod, fmt in list(quantized_modules(model)):
            dt = dtype or mod.compute_dtype
            dev = next(iter(mod.packed_buffers().values())).device
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=dev, dtype=dt)
            with torch.no_grad():
                lin.weight.copy_(fmt.dequantize(mod, dt))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            replace_module(model, name, lin)
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict | None, dict]:
        """save_pretrained's hook for the tensors it writes: all of them (``None``), except while
        :func:`~hf_babai.hf.streamed.save_streamed` copies the quantized block tensors from the run folder itself."""
        if not self.saved_elsewhere:
            return None, {}
        return {k: v for k, v in model.state_dict().items() if k not in self.saved_elsewhere}, {}

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
