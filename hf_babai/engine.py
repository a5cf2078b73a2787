"""Layer-by-layer quantization of a causal LM: the lifecycle around the pure solver.

Works on any transformers decoder stack: the block list is found generically (the largest
``nn.ModuleList`` of identical modules that contain Linears), block-0 inputs are captured once with a
forward pre-hook, and every block then runs on the cached activations (kept on CPU).

Two schedules, both with error propagation (each block sees the already-quantized model's outputs):

- **two pass** (``true_sequential=False``; llm-compressor's sequential pipeline): accumulate every
  Hessian of the block over all calibration batches with the block's float weights, solve, swap, then re-run
  the block to propagate. Every sub-layer's Hessian sees clean in-block inputs.
- **one pass** (``true_sequential=True``; needs the whole calibration set in one forward): a forward
  pre-hook on each target Linear accumulates its Hessian from the input it is *about* to receive, solves,
  and swaps the quantized weight in before the Linear runs. Sub-layers downstream (``o_proj`` after
  ``q/k/v``, ``down_proj`` after ``gate/up``) therefore get Hessians of already-quantized upstream outputs
  (GPTQ's "true sequential"), and the block's output of that same pass is the next block's input: one
  forward per block instead of a calibration pass plus a propagation pass. If a Linear runs twice in one
  forward, that block falls back to two passes (logged).

The default (``true_sequential=None``, "auto"; :func:`uses_one_pass`) is one pass for the int format at ≥ 3 bits
when the calibration set fits one forward, else two passes. Why: measured (README, "Schedule"), the two agree
within noise at 3 and 4 bits on SmolLM2-135M (five settings) and Qwen2.5-0.5B, and one pass saves a forward per
block, the largest single cost on a CPU; but at 2 bits the downstream Hessians of one pass come from upstream
outputs so perturbed that ``o_proj`` and ``down_proj`` are fitted to noise (SmolLM2 2-bit g64 perplexity 213 vs
91 with two passes). The no-clipping formats (``hptq``, ``ssqr``) take llm-compressor's two passes, the
conservative choice, since their schedules were not compared.

Linears that read the same tensor (``q/k/v``, ``gate/up``) share one Hessian and one factorization.
Memory: beside the model, one block's Hessians and the calibration activations (CPU) are alive; the
quantized modules hold packed buffers only.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .formats import BabaiLinear, HuffmanLinear, SSQRLinear
from .formats.huffman import coded_bits
from .solver import (
    DAMP_WIDTH,
    Grid,
    HessianAccumulator,
    HessianFactor,
    QuantResult,
    babai_quantize,
    compute_scales,
    factor_hessian,
    layer_damp,
)
from .solver.babai import LayerStats
from .solver.entropy import EntropyResult, entropy_quantize
from .solver.grid import SCALE_METHODS, SUPPORTED_BITS, count_clipped, dequantize, rtn_quantize
from .solver.ordering import ORDERS
from .solver.refine import refine_result
from .solver.ssqr import ssqr_quantize

log = logging.getLogger(__name__)

METHODS = ("babai", "rtn")
FORMATS = ("int", "hptq", "ssqr")


def default_scale_method(method: str, format: str, bits: int) -> str:
    """``scale_method`` when the user leaves it unset (``QuantSpec`` and ``BabaiConfig`` both ask; ``rescale``
    then defaults to off, since ``"auto"`` refits its second solve itself).

    ``"auto"`` for a Babai int solve at ≥ 3 bits: GPTQ's weight-only MSE scales, and per layer, where that solve's
    error exceeds Babai's no-clipping worst case (:data:`AUTO_SCALES`), a second solve with Hessian-aware scales
    (``"hmse"`` + refit), the lower proxy loss kept. Why (README, Benchmarks): neither rule wins alone. A
    weight-only search can clip the few weights on inputs that carry massive activations (SmolLM2 3-bit
    per-channel: 99.2 perplexity, one down_proj holds 563k of 579k loss; llm-compressor 87.8), while Hessian-aware
    scales everywhere lose where nothing failed (Qwen2.5-0.5B 3-bit per-channel 55.5 vs 47.0, g128 44.7 vs
    42.3). The bound test picks out exactly the failing layers (5 of 210 on SmolLM2 3-bit per-channel, 2 at g128)
    and costs a second solve only there. ``"mse"`` (GPTQ's) elsewhere: ``method="rtn"`` has no ``H``, the other
    formats choose their own scales, and at 2 bits the second solve's lower loss did not mean lower perplexity
    (SmolLM2 2-bit g64: 1214.6 with ``"auto"``, 5 layers re-solved, against 90.8 with ``"mse"``). Hessian-aware
    scales everywhere do win on SmolLM2-135M (4-bit g64: 22.5-22.8 vs 23.3-23.5 over four seeds), whose weights
    already lie on a 4-bit group-32 grid; on Qwen they lose at 4 bits too (39.8 vs 39.0), so that is not a default.
    """
    # unsupported bits fall through to "mse" here; Grid reports them
    auto = method == "babai" and format == "int" and bits in SUPPORTED_BITS and bits != 2
    return "auto" if auto else "mse"


AUTO_SCALES = ("mse", "hmse")
"""``scale_method="auto"``: the first search is solved; the second (with the scale refit) only when the first
solve's damped loss exceeds its Babai bound ``¼ Σ D_jj s_j²``, which without clipping it never can (the bound
is Babai's worst case; ``babai.py``), so clipping has cost more than all of the rounding it saved."""
ENGINE_SCALE_METHODS = (*SCALE_METHODS, "best", "auto")


@dataclass
class QuantSpec:
    """What to do to each Linear; validated on construction."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    method: str = "babai"
    order: str = "act-order"  # measured best on Qwen2.5-0.5B 3-bit and SmolLM2 3-bit (README benchmarks)
    scale_method: str | None = None  # None: "auto" for a Babai int solve at ≥ 3 bits, else "mse"
    damp: float = 0.01
    damp_width: float = DAMP_WIDTH  # damping grows with in_features / calibration tokens (solver.layer_damp)
    block_size: int = 128
    skip: tuple[str, ...] = ("lm_head",)
    skip_first_tokens: int = 0  # research option: leave each window's first real tokens (attention sinks) out of H
    true_sequential: bool | None = None  # one pass per block (True), two (False), None: auto (uses_one_pass)
    format: str = "int"  # "hptq": one scale per matrix, entropy-coded unbounded codes (solver.entropy)
    target_bpw: float | None = None  # hptq only: stored bits per weight to meet, overheads included
    outlier_rate: float | None = None  # ssqr only: fraction of weights allowed to be sparse exact outliers
    refine_sweeps: int = 0  # int format: coordinate-descent sweeps after Babai (solver/refine.py); 0 = Babai only
    rescale: bool | None = None  # refit the scales to the codes under H after the solve (solver/refine.py);
    # None: off ("auto" refits its second solve itself)

    def __post_init__(self) -> None:
        self.grid = Grid(self.bits, self.sym, self.group_size)
        if self.scale_method is None:
            self.scale_method = default_scale_method(self.method, self.format, self.bits)
        if self.rescale is None:
            self.rescale = False
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; use one of {METHODS}")
        if self.order not in ORDERS:
            raise ValueError(f"order={self.order!r} is unknown; use one of {ORDERS}")
        if self.true_sequential is not None and not isinstance(self.true_sequential, bool):
            raise ValueError(f"true_sequential={self.true_sequential!r}: use True, False or None (auto)")
        if self.skip_first_tokens < 0:
            raise ValueError(f"skip_first_tokens={self.skip_first_tokens} must be >= 0")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp={self.damp} must be in [0, 1) (fraction of mean diag H)")
        if not self.damp_width >= 0:
            raise ValueError(f"damp_width={self.damp_width} must be >= 0 (0 = GPTQ's fixed damping)")
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} is unknown; use one of {FORMATS}")
        if self.format == "hptq" and (self.target_bpw is None or self.target_bpw <= 0):
            raise ValueError("format='hptq' needs target_bpw, the stored bits per weight to meet (e.g. 3.125)")
        if self.format != "hptq" and self.target_bpw is not None:
            raise ValueError("target_bpw applies to format='hptq' only; the int format's size follows bits/group_size")
        if self.format == "ssqr":
            if self.outlier_rate is None or not 0 <= self.outlier_rate < 1:
                raise ValueError(
                    "format='ssqr' needs outlier_rate in [0, 1), the fraction of sparse outliers (e.g. 0.01)"
                )
            if self.method != "babai":
                raise ValueError("format='ssqr' tunes scales on the Babai solve; use method='babai'")
        elif self.outlier_rate is not None:
            raise ValueError("outlier_rate applies to format='ssqr' only")
        if self.refine_sweeps < 0 or (self.refine_sweeps and (self.format != "int" or self.method != "babai")):
            raise ValueError("refine_sweeps must be ≥ 0 and applies to format='int' with method='babai' only")
        if self.scale_method in ("hmse", "best", "auto") and self.method != "babai":
            raise ValueError(
                f"scale_method={self.scale_method!r} weighs the search by diag H; method='rtn' has none: use 'mse'"
            )
        if self.scale_method in ("best", "auto") and self.format != "int":
            raise ValueError(
                f"scale_method={self.scale_method!r} (a second solve, the lower loss kept) applies to format='int' "
                "only; use 'mse' or 'hmse'"
            )
        if self.scale_method not in ENGINE_SCALE_METHODS:
            raise ValueError(f"scale_method={self.scale_method!r} is unknown; use one of {ENGINE_SCALE_METHODS}")
        if self.rescale and (self.format != "int" or self.method != "babai"):
            raise ValueError("rescale applies to format='int' with method='babai' only")


def uses_one_pass(spec: QuantSpec, n_samples: int, batch_size: int | None = None) -> bool:
    """Whether :func:`quantize_model` runs the one-pass schedule for ``spec`` on ``n_samples`` calibration
    samples split into forwards of ``batch_size`` (``None``: all at once).

    ``spec.true_sequential`` decides when set; ``None`` (auto) means one pass for the int format at ≥ 3 bits when
    every sample fits one forward (as good as two passes there and one forward per block cheaper), two passes
    otherwise (far better at 2 bits; see the module docstring)."""
    if spec.true_sequential is not None:
        return spec.true_sequential
    whole = batch_size is None or batch_size >= n_samples
    return spec.format == "int" and spec.bits >= 3 and whole


@dataclass
class LayerRecord:
    block: int
    name: str
    out_features: int
    in_features: int
    tokens: int
    stats: dict[str, float | int | str] = field(default_factory=dict)

    def row(self) -> dict[str, float | int | str]:
        return {
            "block": self.block,
            "layer": self.name,
            "out": self.out_features,
            "in": self.in_features,
            "tokens": self.tokens,
            **self.stats,
        }


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are stored."""


class _CalledTwice(Exception):
    """A Linear ran twice in one block forward: the one-pass schedule cannot serve it."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list: the ``nn.ModuleList`` of ≥2 same-class modules holding the most Linears."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        n_lin = sum(isinstance(x, nn.Linear) for x in mod.modules())
        if n_lin and (best is None or n_lin > best[0]):
            best = (n_lin, name, mod)
    if best is None:
        raise ValueError(
            "no decoder block list found: expected an nn.ModuleList of identical blocks containing nn.Linear "
            "layers (e.g. model.model.layers)"
        )
    return best[1], best[2]


def target_linears(block: nn.Module, skip: tuple[str, ...], prefix: str = "") -> dict[str, nn.Linear]:
    """Linears of a block to quantize, in module order (block-relative names), minus those whose full name
    ``prefix + "." + name`` contains any ``skip`` substring."""
    out = {}
    for n, m in block.named_modules():
        full = f"{prefix}.{n}" if prefix else n
        if isinstance(m, nn.Linear) and not isinstance(m, BabaiLinear) and not any(s in full for s in skip):
            out[n] = m
    return out


def quantizable_linears(model: nn.Module, skip: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Every Linear the engine quantizes, by full module name: the Linears inside the decoder blocks minus the
    ``skip`` substrings. Quantize-on-load and pre-quantized loading both use this one rule, so a checkpoint's
    packed modules are exactly the ones its loader rebuilds."""
    name, blocks = find_blocks(model)
    return {
        f"{name}.{i}.{n}": lin
        for i, block in enumerate(blocks)
        for n, lin in target_linears(block, skip, f"{name}.{i}").items()
    }


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device if it dispatched the module, else the device
    of its first non-meta tensor (meta tensors are disk- or CPU-offloaded weights), else CPU."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def onload_block(block: nn.Module) -> None:
    """Materialises the accelerate-offloaded (CPU or disk) weights of ``block`` on its execution device and
    removes those offload hooks, so the block can be quantized as a plain module. Blocks that are not offloaded
    are left untouched; non-offloading hooks (which move inputs between devices) are kept.

    The quantized block then stays resident at quantized size (packed buffers plus small norms), which is the
    point of quantize-on-load: peak memory is about one float block plus the quantized model."""
    for mod in list(block.modules()):
        hook = getattr(mod, "_hf_hook", None)
        if hook is None or not getattr(hook, "offload", False):
            continue
        from accelerate.hooks import remove_hook_from_module

        hook.pre_forward(mod)  # loads the weights from the offload map onto the execution device
        hook.offload = False  # so detaching does not send them back to meta
        remove_hook_from_module(mod)


def capture_block_inputs(
    model: nn.Module,
    block: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    progress: bool = False,
) -> list[tuple[torch.Tensor, dict]]:
    """Runs the model up to block 0 per calibration batch and returns ``(hidden_states, kwargs)`` per batch
    (hidden states on CPU; the kwargs such as rotary embeddings and the causal mask as given)."""
    store: list[tuple[torch.Tensor, dict]] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        store.append((hidden.detach().cpu(), kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = execution_device(model)
    try:
        with torch.no_grad():
            starts = range(0, input_ids.shape[0], batch_size)
            for start in tqdm(starts, desc="calibration inputs", disable=not progress, leave=False):
                batch = {"input_ids": input_ids[start : start + batch_size].to(device), "use_cache": False}
                if attention_mask is not None:
                    batch["attention_mask"] = attention_mask[start : start + batch_size].to(device)
                with contextlib.suppress(_StopForward):
                    model(**batch)
    finally:
        handle.remove()
    return store


def _block_output(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, child, new)


class _BlockQuantizer:
    """Hessian bookkeeping and solving for the Linears of one block."""

    def __init__(self, linears: dict[str, nn.Linear], spec: QuantSpec) -> None:
        self.linears = linears
        self.spec = spec
        self.acc: dict[str, HessianAccumulator] = {}
        self.factors: dict[int, HessianFactor] = {}
        self.results: dict[str, QuantResult | EntropyResult] = {}
        self.originals: dict[str, torch.Tensor] = {}
        self._last: tuple[torch.Tensor, int, HessianAccumulator] | None = None

    def accumulate(self, name: str, x: torch.Tensor, mask: torch.Tensor | None, *, streaming: bool = False) -> None:
        """Adds ``x`` to ``name``'s Hessian. Siblings called back to back on the very same tensor object
        (``q/k/v``, ``gate/up``) share one accumulator; only the last input is remembered, by identity
        (a freed tensor's address can be reused, so addresses alone would alias unrelated inputs).

        ``streaming`` (the one-pass schedule, where each Linear is solved in its own hook): a new input means
        every user of the previous one is solved, so that Hessian and its factor are freed now rather than at
        the end of the block (each is K² float64 words: ~200 MB for a 5k-wide down_proj)."""
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:
            self.acc.setdefault(name, last[2])
            return
        if streaming and last is not None:
            self._release(last[2])
        acc = self.acc.setdefault(name, HessianAccumulator(x.shape[-1]))
        m = mask if mask is not None and mask.shape == x.shape[:-1] else None
        acc.add(x, m)
        self._last = (x, x._version, acc)

    def new_batch(self) -> None:
        self._last = None

    def _release(self, acc: HessianAccumulator) -> None:
        """Drops ``acc`` and its factor (together: factors are keyed by the accumulator's ``id``)."""
        self.factors.pop(id(acc), None)
        for n in [n for n, a in self.acc.items() if a is acc]:
            del self.acc[n]
        if self._last is not None and self._last[2] is acc:
            self._last = None

    def release_if_done(self, name: str) -> None:
        """After ``name`` is solved in the two-pass schedule: free its Hessian once no unsolved Linear shares it."""
        acc = self.acc.get(name)
        if acc is not None and all(n in self.results for n, a in self.acc.items() if a is acc):
            self._release(acc)

    def solve(self, name: str) -> QuantResult | EntropyResult:
        lin = self.linears[name]
        w = lin.weight.detach().float()
        spec = self.spec
        acc = self.acc.get(name)
        if acc is None:
            log.warning("%s received no calibration tokens; its Hessian is empty and it is rounded to nearest", name)
            acc = HessianAccumulator(w.shape[1])
        factor = self.factors.get(id(acc))
        if factor is None:
            damp = layer_damp(w.shape[1], acc.n, spec.damp, spec.damp_width)
            factor = factor_hessian(acc.finalize(), spec.order, damp)
            self.factors[id(acc)] = factor
        if spec.format == "hptq":
            res = entropy_quantize(w, factor, spec.target_bpw, code_bits=coded_bits, block_size=spec.block_size)
        elif spec.format == "ssqr":
            res, _ = ssqr_quantize(
                w, factor, spec.grid, spec.outlier_rate, scale_method=spec.scale_method, block_size=spec.block_size
            )
        else:
            res = self._solve_int(w, factor, acc)
        self.results[name] = res
        _trim_heap()
        return res

    def _solve_int(self, w: torch.Tensor, factor: HessianFactor, acc: HessianAccumulator) -> QuantResult:
        """The int-format solve under ``spec.scale_method``; ``stats.scales`` records the search that was kept.

        ``"best"`` and ``"auto"`` return the candidate with the lower proxy loss; each candidate is a full,
        exact solve, so the kept stats are those of a real run."""
        spec = self.spec
        hessian = acc.finalize  # H itself (finalize scales in place once), only read if a refinement runs

        def run(method: str, rescale: bool) -> tuple[QuantResult, QuantResult]:
            babai = babai_quantize(w, factor, spec.grid, scale_method=method, block_size=spec.block_size)
            res = babai
            if spec.refine_sweeps or rescale:
                res = refine_result(w, hessian(), factor.damping, babai, spec.grid, spec.refine_sweeps, rescale=rescale)
            label = method + ("+refit" if rescale else "")
            return replace(res, stats=replace(res.stats, scales=label)), babai

        if spec.scale_method in ("best", "auto"):
            first, babai = run(AUTO_SCALES[0], spec.rescale)
            cands = [first]
            # "auto": the second solve only where clipping broke Babai's no-clipping worst case; "best": always
            if spec.scale_method == "best" or babai.stats.loss_damped > babai.stats.bound:
                cands.append(run(AUTO_SCALES[1], True)[0])
        else:
            cands = [run(spec.scale_method, spec.rescale)[0]]
        return min(cands, key=lambda r: r.stats.loss)  # first wins ties


def _rtn(w: torch.Tensor, spec: QuantSpec) -> QuantResult | EntropyResult:
    """Round-to-nearest on the same grid and scales (HRTN for hptq); no Hessian, so loss and bound are NaN."""
    if spec.format == "hptq":
        return entropy_quantize(w.float(), None, spec.target_bpw, code_bits=coded_bits)
    start = time.perf_counter()
    scales, zeros = compute_scales(w.float(), spec.grid, spec.scale_method)
    codes = rtn_quantize(w.float(), scales, zeros, spec.grid)
    n, k = w.shape
    nan = float("nan")
    stats = LayerStats(
        loss=nan,
        loss_damped=nan,
        bound=nan,
        expected=nan,
        trace_d=nan,
        clipped=count_clipped(w, scales, zeros, spec.grid),
        weights=n * k,
        damping=0.0,
        rank=-1,
        dead=0,
        order="rtn",
        seconds=time.perf_counter() - start,
    )
    return QuantResult(codes, scales, zeros, stats)


def _dense(res: QuantResult | EntropyResult, spec: QuantSpec) -> torch.Tensor:
    """The quantized weight as a float32 matrix (what the one-pass schedule runs the rest of the block with)."""
    if isinstance(res, EntropyResult):
        return res.codes.float() * res.scale
    w = dequantize(res.codes, res.scales, res.zeros, spec.grid)
    return w if res.outliers is None else w + res.outliers.to_dense().to(w.device)


def _swap_in(block: nn.Module, name: str, lin: nn.Linear, res: QuantResult | EntropyResult, spec: QuantSpec) -> None:
    if isinstance(res, EntropyResult):
        _replace(block, name, HuffmanLinear.from_linear(lin, res.codes, res.scale))
        return
    if res.outliers is not None:
        args = (lin, res.codes, res.scales, res.zeros, spec.bits, spec.group_size, spec.sym)
        _replace(block, name, SSQRLinear.from_linear(*args, outliers=res.outliers))
        return
    _replace(
        block,
        name,
        BabaiLinear.from_linear(lin, res.codes, res.scales, res.zeros, spec.bits, spec.group_size, spec.sym),
    )


def _release_freed_memory() -> None:
    """Frees each block's float copies once it is quantized and returns the memory to the OS.

    The replaced Linears of an accelerate-offloaded block sit in reference cycles (its hooks wrap ``forward``
    in closures over the module), so they are only freed by the cycle collector: without ``gc.collect`` an
    offloaded run keeps one float block per quantized block."""
    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    """``malloc_trim`` (glibc only): hands freed heap back to the OS. glibc keeps freed mid-sized chunks (its mmap
    threshold grows to 32 MB as large tensors are freed), so the freed temporaries of one layer's solve would
    otherwise still count against the process while the next, wider layer allocates its own; called after each
    layer and each block (a few milliseconds)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass


def _to(obj, device: torch.device):
    """Tensors (also inside tuples/lists/dicts, e.g. rotary ``(cos, sin)``) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _run_block(block: nn.Module, inputs: list[tuple[torch.Tensor, dict]], device: torch.device) -> list[torch.Tensor]:
    with torch.no_grad():
        return [_block_output(block(h.to(device), **_to(kw, device))).detach().cpu() for h, kw in inputs]


def _one_pass(
    block: nn.Module, linears: dict[str, nn.Linear], bq: _BlockQuantizer, inp: tuple[torch.Tensor, dict], mask, device
) -> torch.Tensor:
    """Quantize each Linear just before it runs; the pass's output is the quantized block's output."""
    handles = []

    def make_hooks(name: str) -> tuple[Callable, Callable]:
        def quantize(mod: nn.Linear, args: tuple) -> None:
            if name in bq.results:
                raise _CalledTwice(name)
            bq.accumulate(name, args[0], mask, streaming=True)
            res = bq.solve(name)
            bq.originals[name] = mod.weight.data
            mod.weight.data = _dense(res, bq.spec).to(mod.weight.dtype)

        def restore(mod: nn.Linear, _args: tuple, _out: torch.Tensor) -> None:
            # the dense quantized copy was only for this call; holding one per Linear would add a float block
            mod.weight.data = bq.originals[name]

        return quantize, restore

    for name, lin in linears.items():
        pre, post = make_hooks(name)
        handles += [lin.register_forward_pre_hook(pre), lin.register_forward_hook(post)]
    try:
        out = _run_block(block, [inp], device)[0]
    except _CalledTwice:
        for name, w in bq.originals.items():
            linears[name].weight.data = w
        raise
    finally:
        for h in handles:
            h.remove()
    for name in linears:  # Linears the forward never reached (e.g. an unused MoE expert)
        if name not in bq.results:
            bq.solve(name)
    return out


def _two_pass(
    block: nn.Module, linears: dict[str, nn.Linear], bq: _BlockQuantizer, inputs, masks, device
) -> list[torch.Tensor]:
    handles = []
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(name: str) -> Callable:
        def hook(_mod: nn.Linear, args: tuple) -> None:
            bq.accumulate(name, args[0], current["mask"])

        return hook

    for name, lin in linears.items():
        handles.append(lin.register_forward_pre_hook(make_hook(name)))
    try:
        with torch.no_grad():
            for (h, kw), m in zip(inputs, masks, strict=True):
                bq.new_batch()
                current["mask"] = m
                block(h.to(device), **_to(kw, device))
    finally:
        for hd in handles:
            hd.remove()
    for name in linears:
        bq.solve(name)
        bq.release_if_done(name)
    for name, lin in linears.items():
        _swap_in(block, name, lin, bq.results[name], bq.spec)
    return _run_block(block, inputs, device)


def _quantize_block(
    block: nn.Module,
    b: int,
    linears: dict[str, nn.Linear],
    spec: QuantSpec,
    inputs: list[tuple[torch.Tensor, dict]],
    masks: list,
    one_pass: bool,
) -> tuple[list[torch.Tensor], dict[str, tuple[tuple[int, int], LayerStats]]]:
    """Quantizes one onloaded block in place; returns its outputs (the next block's inputs) and per-layer stats.

    A function of its own so that everything the solve built — Hessians, factors (for a 5k-wide layer each is
    ~200 MB), the float weights the one-pass schedule swaps in — is unreachable once it returns, before the
    caller frees memory; held by a loop variable they lived on into the next block's quantization."""
    device = execution_device(block)
    bq = _BlockQuantizer(linears, spec)
    outputs = None
    if one_pass:
        try:
            outputs = [_one_pass(block, linears, bq, inputs[0], masks[0], device)]
            for name, lin in linears.items():
                _swap_in(block, name, lin, bq.results[name], spec)
        except _CalledTwice as e:
            log.warning("block %d: %s runs twice per forward; this block uses the two-pass schedule", b, e)
            bq = _BlockQuantizer(linears, spec)
    if outputs is None:
        outputs = _two_pass(block, linears, bq, inputs, masks, device)
    return outputs, {name: (tuple(lin.weight.shape), bq.results[name].stats) for name, lin in linears.items()}


def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    batch_size: int | None = None,
    log_path: str | Path | None = None,
    progress: bool = True,
) -> list[LayerRecord]:
    """Quantizes every target Linear of every decoder block in place; returns the per-layer records.

    Args:
        model: a causal LM (any transformers decoder).
        spec: grid, method and solver settings.
        input_ids: calibration token windows ``[n, T]`` (not needed for ``method="rtn"``).
        attention_mask: optional ``[n, T]``; padded positions are left out of every Hessian.
        batch_size: samples per forward; ``None`` = all at once (``spec.true_sequential`` needs that).
        log_path: where to write the per-layer table (``quant_log.csv``).
    """
    blocks_name, blocks = find_blocks(model)
    records: list[LayerRecord] = []
    if spec.method == "babai" and input_ids is None:
        raise ValueError("method='babai' needs calibration input_ids; pass them or use method='rtn'")
    n = 0 if input_ids is None else input_ids.shape[0]
    bs = n if batch_size is None else batch_size
    one_pass = spec.method != "rtn" and uses_one_pass(spec, n, batch_size)
    if spec.true_sequential and spec.method != "rtn" and bs < n:
        raise ValueError(
            f"true_sequential=True quantizes inside one forward of all {n} calibration samples, but batch_size={bs} "
            "splits them; leave batch_size unset or use true_sequential=False (the two-pass schedule)"
        )
    inputs = (
        [] if spec.method == "rtn" else capture_block_inputs(model, blocks[0], input_ids, attention_mask, bs, progress)
    )
    masks = [None] * len(inputs)
    hmask = attention_mask  # positions that enter the Hessians
    if spec.skip_first_tokens and input_ids is not None:
        real = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        hmask = real * (real.cumsum(1) > spec.skip_first_tokens)  # first real tokens, also under left padding
    if hmask is not None:
        masks = [hmask[i : i + bs] for i in range(0, n, bs)]
    tokens = int(hmask.sum()) if hmask is not None else n * (0 if input_ids is None else input_ids.shape[1])
    if spec.method != "rtn":
        log.info("schedule: %s per block", "one pass" if one_pass else "two passes")
    bar = tqdm(range(len(blocks)), desc="quantizing blocks", disable=not progress)
    total_loss = 0.0
    for b in bar:
        block = blocks[b]
        onload_block(block)
        linears = target_linears(block, spec.skip, f"{blocks_name}.{b}")
        if spec.method == "rtn":
            for name, lin in linears.items():
                res = _rtn(lin.weight.detach(), spec)
                _swap_in(block, name, lin, res, spec)
                records.append(LayerRecord(b, name, *lin.weight.shape, 0, res.stats.as_dict()))
                _log_layer(records[-1])
            continue
        outputs, stats = _quantize_block(block, b, linears, spec, inputs, masks, one_pass)
        del linears  # the float Linears: freed below with the block's Hessians and factors
        inputs = [(o, kw) for o, (_, kw) in zip(outputs, inputs, strict=True)]
        for name, (shape, st) in stats.items():
            total_loss += st.loss
            records.append(LayerRecord(b, name, *shape, tokens, st.as_dict()))
            _log_layer(records[-1])
        bar.set_postfix(loss=f"{total_loss:.4g}")
        _release_freed_memory()
    if log_path is not None:
        write_log(records, log_path)
    return records


LAYER_TABLE_HEADER = (
    f"{'block':>5} {'layer':<22} {'out':>6} {'in':>6} {'loss':>11} {'bound':>11} {'clip%':>6} {'rank':>6} {'sec':>6}"
)


def _log_layer(rec: LayerRecord) -> None:
    """One row of the live per-layer table (logger ``hf_babai.engine``, level INFO; the CLI shows it)."""
    if not log.isEnabledFor(logging.INFO):
        return
    st = rec.stats
    clip = 100.0 * float(st["clipped"]) / max(1, int(st["weights"]))
    log.info(
        "%5d %-22s %6d %6d %11.4g %11.4g %6.2f %6s %6.2f",
        rec.block,
        rec.name[-22:],
        rec.out_features,
        rec.in_features,
        st["loss"],
        st["bound"],
        clip,
        st["rank"],
        st["seconds"],
    )


def write_log(records: list[LayerRecord], path: str | Path) -> None:
    """The per-layer table as CSV (one row per quantized Linear)."""
    rows = [r.row() for r in records]
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def model_bits_per_weight(model: nn.Module) -> float:
    """True storage bits per weight over all quantized Linears (codes + scales + zeros + padding)."""
    from .formats import bits_per_weight

    total = 0.0
    weights = 0
    for m in model.modules():
        if isinstance(m, BabaiLinear):
            bpw = bits_per_weight(m.packed_buffers(), m.in_features, m.out_features)
            total += bpw * m.in_features * m.out_features
        elif isinstance(m, HuffmanLinear):
            total += m.storage_bits()
        else:
            continue
        weights += m.in_features * m.out_features
    if not weights:
        raise ValueError("the model has no quantized (BabaiLinear / HuffmanLinear) layers")
    return total / weights
