"""Layer-by-layer quantization of a causal LM: the lifecycle around the pure solver.

One room per job: :mod:`.blocks` (finding and onloading decoder blocks, running them), :mod:`.hessians` (Hessian
capture), :mod:`.policy` (damping, schedule choice, solving one layer), :mod:`.schedules` (one pass, two passes,
round to nearest, as named objects with numbered steps) and :mod:`.report` (records, ``quant_log.csv``).
:func:`quantize_model` is the short driver that ties them together.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats import model_bits_per_weight
from ..spec import QuantSpec
from .blocks import (
    capture_block_inputs,
    capture_block_kwargs,
    execution_device,
    find_blocks,
    linear_dims,
    linearize_conv1d,
    mixed_layer_types,
    onload_block,
    quantizable_linears,
    release_freed_memory,
    replace_module,
    run_block,
    target_linears,
    text_entry,
    tower_linears,
)
from .coverage import check_float_weights, float_share, weight_kinds, weight_report
from .distributed import Ranks
from .experts import UnfusedExperts, set_expert_calibration, unfuse_experts
from .hessians import BlockHessians, capture_hessians
from .policy import QuantizationError, layer_damping, solve_layer, uses_one_pass
from .report import LAYER_TABLE_HEADER, TOWER_BLOCK, LayerRecord, log_layer, write_log
from .resume import BlockStore, run_identity
from .routers import expose_routers, router_linears
from .schedules import BlockJob, OnePass, RoundToNearest, Schedule, TwoPass, run_schedule, schedule_for

__all__ = [
    "LAYER_TABLE_HEADER",
    "TOWER_BLOCK",
    "BlockHessians",
    "BlockJob",
    "BlockStore",
    "LayerRecord",
    "OnePass",
    "QuantSpec",
    "QuantizationError",
    "Ranks",
    "RoundToNearest",
    "Schedule",
    "TwoPass",
    "UnfusedExperts",
    "capture_block_inputs",
    "capture_hessians",
    "check_float_weights",
    "execution_device",
    "expose_routers",
    "find_blocks",
    "float_share",
    "layer_damping",
    "linear_dims",
    "model_bits_per_weight",
    "onload_block",
    "quantizable_linears",
    "quantize_model",
    "replace_module",
    "round_towers",
    "router_linears",
    "run_identity",
    "solve_layer",
    "target_linears",
    "text_entry",
    "tower_linears",
    "unfuse_experts",
    "uses_one_pass",
    "weight_kinds",
    "weight_report",
    "write_log",
]

log = logging.getLogger(__name__)


def warn_narrow_layers(model: nn.Module, spec: QuantSpec) -> list[str]:
    """The rule for a Linear narrower than ``group_size``: it gets one group spanning its whole input width (its
    scales are then per output channel, the best a group that size can do). Said once, naming the layers, so the
    change of grid is never silent; returns their names."""
    if spec.group_size == -1:
        return []
    narrow = [n for n, lin in quantizable_linears(model, spec).items() if linear_dims(lin)[0] < spec.group_size]
    if narrow:
        shown = ", ".join(narrow[:5]) + (f" and {len(narrow) - 5} more" if len(narrow) > 5 else "")
        log.warning(
            "%d layers are narrower than group_size=%d, so each is quantized with one group over its whole input "
            "width (per-channel scales): %s",
            len(narrow),
            spec.group_size,
            shown,
        )
    return narrow


def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    batch_size: int | None = None,
    log_path: str | Path | None = None,
    progress: bool = True,
    ranks: Ranks | None = None,
    store: BlockStore | None = None,
) -> list[LayerRecord]:
    """Quantizes every target Linear of every decoder block in place; returns the per-layer records.

    Args:
        model: a causal LM (any transformers decoder).
        spec: format, grid, method and solver settings.
        input_ids: calibration token windows ``[n, T]`` (not needed for ``method="rtn"``).
        attention_mask: optional ``[n, T]``; padded positions are left out of every Hessian.
        batch_size: samples per forward (default ``spec.batch_size``; ``None``: all at once).
        log_path: where to write the per-layer table (``quant_log.csv``; rank 0 only).
        ranks: the process group's ranks (default: :meth:`Ranks.current`, so a run under an initialized
            torch.distributed group is shared between its ranks; see ``docs/distributed.md``).
        store: where each finished block is written as the run goes (rank 0), and from which the blocks an
            interrupted run finished are rebuilt instead of quantized again (:class:`BlockStore`).
    """
    blocks_name, blocks = find_blocks(model)
    rtn = spec.method == "rtn"
    if not rtn and input_ids is None:
        raise ValueError("method='babai' needs calibration input_ids; pass them or use method='rtn'")
    ranks = None if rtn else (ranks or Ranks.current())
    batch_size = spec.batch_size if batch_size is None else batch_size
    n = 0 if input_ids is None else input_ids.shape[0]
    bs = n if batch_size is None else batch_size
    if spec.true_sequential and not rtn and bs < n:
        raise ValueError(
            f"true_sequential=True quantizes inside one forward of all {n} calibration samples, but batch_size={bs} "
            "splits them; leave batch_size unset or use true_sequential=False (the two-pass schedule)"
        )
    if ranks is not None:  # each rank forwards its share of the samples: one forward never sees them all
        if spec.true_sequential:
            raise ValueError(
                f"true_sequential=True needs every calibration sample in one forward, but {ranks.world} ranks share "
                "them; use true_sequential=False (the two-pass schedule) or run in one process"
            )
        share = ranks.share(n)
        input_ids = input_ids[share]
        attention_mask = None if attention_mask is None else attention_mask[share]
        n = input_ids.shape[0]
        bs = min(bs, n)
        progress = progress and ranks.rank == 0
        log.info("distributed: rank %d of %d calibrates samples %d..%d", ranks.rank, ranks.world, share.start,
                 share.stop - 1)  # fmt: skip
    schedule = TwoPass() if ranks is not None else schedule_for(spec, uses_one_pass(spec, n, batch_size))
    entry = model if rtn else text_entry(model, blocks_name, input_ids, attention_mask)
    inputs = [] if rtn else capture_block_inputs(entry, blocks[0], input_ids, attention_mask, bs, progress)
    per_block = None  # each block's own arguments, where the model hands different layers different ones
    if not rtn and inputs and mixed_layer_types(model):
        per_block = capture_block_kwargs(entry, blocks, input_ids, attention_mask, bs)
    if not rtn and not inputs:
        raise ValueError(
            f"the model's forward on token ids never reached {blocks_name}.0, so its blocks cannot be calibrated from "
            "text: the block list found is not the text decoder (an image encoder, say); quantize a causal LM whose "
            "decoder blocks run on input_ids"
        )
    check_float_weights(model, spec.skip)  # before any solve: a weight nobody would quantize is named now
    warn_narrow_layers(model, spec)
    masks = [None] * len(inputs) if attention_mask is None else [attention_mask[i : i + bs] for i in range(0, n, bs)]
    float_stream = [h for h, _ in inputs] if spec.asym_alpha else None  # the float model's hidden states
    log.info("schedule: %s per block", schedule.name)
    records: list[LayerRecord] = []
    total_loss = 0.0
    bar = tqdm(range(len(blocks)), desc="quantizing blocks", disable=not progress)
    for b in bar:
        block = blocks[b]
        if per_block is not None:
            inputs = [(h, kw) for (h, _), kw in zip(inputs, per_block[b], strict=True)]
        onload_block(block)
        linearize_conv1d(block)
        unfuse_experts(block)
        if spec.quantize_router:
            expose_routers(block)
        if store is not None and b < store.finished:  # done by the interrupted run: rebuilt, then run for the
            if float_stream is not None:  # next block's inputs, as it did (the float stream first, in float)
                float_stream = run_block(block, [(f, kw) for f, (_, kw) in zip(float_stream, inputs, strict=True)],
                                         execution_device(block))  # fmt: skip
            loaded = store.load(b, block, spec, f"{blocks_name}.{b}")
            records += loaded
            total_loss += sum(float(r.stats["loss"]) for r in loaded)
            if not rtn:
                outputs = run_block(block, inputs, execution_device(block))
                inputs = [(o, kw) for o, (_, kw) in zip(outputs, inputs, strict=True)]
            release_freed_memory()
            continue
        set_expert_calibration(block, spec.expert_calibration)
        linears = target_linears(block, spec.skip, f"{blocks_name}.{b}", spec.quantize_router)
        job = BlockJob(block, b, linears, spec, inputs, masks, ranks, fp_inputs=float_stream)
        try:
            outputs, stats = run_schedule(schedule, job)
        except (ValueError, torch.linalg.LinAlgError) as e:  # the layer's full name, whoever raised
            raise QuantizationError(
                f"{blocks_name}.{b}.{e}" if isinstance(e, QuantizationError) else f"{blocks_name}.{b}: {e}"
            ) from e
        set_expert_calibration(block, "routed")
        float_stream = job.fp_outputs
        del linears, job  # the float Linears: freed below with the block's Hessians and factors
        if outputs is not None:
            inputs = [(o, kw) for o, (_, kw) in zip(outputs, inputs, strict=True)]
        done = [LayerRecord(b, name, *shape, seen, st.as_dict()) for name, (shape, st, seen) in stats.items()]
        for rec in done:
            total_loss += float(rec.stats["loss"])
            log_layer(rec)
        records += done
        if store is not None and (ranks is None or ranks.rank == 0):
            store.save(b, block, done)
            store.map_into(b, block)  # its packed tensors now read from the file: private memory stays flat
        if not rtn:
            bar.set_postfix(loss=f"{total_loss:.4g}")
        release_freed_memory()
    if spec.vision_tower == "rtn":
        records += round_towers(model, spec)
    if log_path is not None and (ranks is None or ranks.rank == 0):
        write_log(records, log_path)
    return records


def round_towers(model: nn.Module, spec: QuantSpec) -> list[LayerRecord]:
    """``vision_tower="rtn"``: rounds every Linear outside the language model (:func:`.blocks.tower_linears`) to
    nearest in ``spec``'s format and grid, in place; their records carry block ``TOWER_BLOCK``.

    Calibration text never reaches a vision tower, so its Linears have no Hessian: they are rounded with the
    Hessian-free scale search (``mse`` where the spec's ``auto``/``hmse`` weigh by ``diag H``), and said so in the
    log. Image-text calibration would give them the nearest-plane solve instead (``docs/architectures.md``)."""
    linears = tower_linears(model, spec.skip)
    if not linears:
        return []
    for name in linears:
        onload_block(model.get_submodule(name))
    linearize_conv1d(model, set(linears))
    linears = tower_linears(model, spec.skip)
    scale = "mse" if spec.scale_method in ("auto", "hmse") else spec.scale_method
    rtn = dataclasses.replace(spec, method="rtn", scale_method=scale, asym_alpha=0.0, true_sequential=None)
    log.info(
        "vision_tower='rtn': rounding %d Linears outside the language model to nearest (scale search %s, no "
        "calibration)", len(linears), scale,
    )  # fmt: skip
    _, stats = run_schedule(RoundToNearest(), BlockJob(model, TOWER_BLOCK, linears, rtn, [], []))
    done = [LayerRecord(TOWER_BLOCK, name, *shape, seen, st.as_dict()) for name, (shape, st, seen) in stats.items()]
    for rec in done:
        log_layer(rec)
    release_freed_memory()
    return done
