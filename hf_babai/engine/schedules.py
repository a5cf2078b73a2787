"""The schedules: how one onloaded block is calibrated, solved and propagated. Each is a named object with
numbered steps; the driver (:func:`hf_babai.engine.quantize_model`) picks one per run and hands it every block.

Both calibrated schedules propagate errors (each block sees the already-quantized model's outputs) and share a
Hessian and its factor between Linears that read the same tensor (``q/k/v``, ``gate/up``). Which one is the
default where, and why: :func:`hf_babai.engine.policy.uses_one_pass` and ``docs/design.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..formats import get_format
from ..solver import CrossAccumulator, LayerStats
from ..spec import QuantSpec
from .blocks import _hidden, execution_device, linear_dims, move_to, replace_module, run_block
from .distributed import Ranks, owners, solve_cost
from .hessians import BlockHessians
from .policy import solve_layer

log = logging.getLogger(__name__)

BlockStats = dict[str, tuple[tuple[int, int], LayerStats, int]]  # shape, stats, calibration tokens seen


@dataclass
class BlockJob:
    """One block to quantize: the block, its index, the Linears to quantize (block-relative names), the settings,
    the cached inputs ``(hidden, kwargs)`` per calibration batch and the Hessian mask of each batch."""

    block: nn.Module
    index: int
    linears: dict[str, nn.Linear]
    spec: QuantSpec
    inputs: list[tuple[torch.Tensor, dict]]
    masks: list[torch.Tensor | None]
    ranks: Ranks | None = None
    # asym_alpha: the float model's hidden states entering this block, per batch (the float stream), and, once
    # the schedule ran, those leaving it
    fp_inputs: list[torch.Tensor] | None = None
    fp_outputs: list[torch.Tensor] | None = None

    def stats(self, solutions: dict[str, Any], tokens: dict[str, int] | None = None) -> BlockStats:
        """Each Linear's shape, solve record and the calibration tokens its Hessian saw (an MoE expert sees only
        the tokens routed to it)."""
        tokens = tokens or {}
        return {n: (tuple(lin.weight.shape), solutions[n].stats, tokens.get(n, 0)) for n, lin in self.linears.items()}

    def swap_in(self, solutions: dict[str, Any]) -> None:
        fmt = get_format(self.spec.format)
        for name, lin in self.linears.items():
            replace_module(self.block, name, fmt.build(lin, solutions[name], self.spec))


class CalledTwice(Exception):
    """A Linear ran twice in one block forward: the one-pass schedule cannot serve that block."""


class Schedule:
    """``run(job)`` quantizes ``job.block`` in place and returns the next block's inputs (``None``: unchanged)
    and each Linear's ``(shape, stats)``."""

    name: str = ""

    def run(self, job: BlockJob) -> tuple[list[torch.Tensor] | None, BlockStats]:
        raise NotImplementedError


class RoundToNearest(Schedule):
    """``method="rtn"``: no calibration data, nothing to propagate.

    1. round every Linear to nearest in the format;
    2. swap the quantized modules in."""

    name = "round to nearest"

    def run(self, job: BlockJob) -> tuple[None, BlockStats]:
        fmt = get_format(job.spec.format)
        solutions = {name: fmt.round(lin.weight.detach(), job.spec) for name, lin in job.linears.items()}  # 1
        stats = job.stats(solutions)
        job.swap_in(solutions)  # 2
        return None, stats


class TwoPass(Schedule):
    """llm-compressor's sequential pipeline: every sub-layer's Hessian sees the block's float inputs.

    1. for each group of Linears whose Hessians fit ``spec.hessian_budget_gb`` (one group for a dense block; an
       MoE block's experts a few at a time): one forward per calibration batch with the float weights,
       accumulating the group's Hessians, then solve the group, freeing each Hessian once its users are solved;
    2. swap the quantized modules in;
    3. run the quantized block on every batch: its outputs are the next block's inputs.

    Every Hessian sees the same float inputs whatever the grouping, so the result is the same; a group costs one
    more forward of the block."""

    name = "two passes"

    def run(self, job: BlockJob) -> tuple[list[torch.Tensor], BlockStats]:
        device = execution_device(job.block)
        solutions: dict[str, Any] = {}
        tokens: dict[str, int] = {}
        groups = hessian_groups(job.linears, job.spec.hessian_budget_gb)
        if job.fp_inputs is not None:
            job.fp_outputs = []
        for group in groups:  # 1
            hessians = BlockHessians(job.spec)
            current: dict[str, torch.Tensor | None] = {"mask": None}

            def make_hook(name: str, hessians: BlockHessians = hessians, current: dict = current) -> Callable:
                def hook(_mod: nn.Linear, args: tuple) -> None:
                    if current.get("float pass"):
                        return
                    ref = current.get("reference")  # taken once: a second call has no float input to pair with
                    x_float = None if ref is None else ref.pop(name, None)
                    hessians.accumulate(name, args[0], current["mask"], reference=x_float)

                return hook

            handles = [job.linears[name].register_forward_pre_hook(make_hook(name)) for name in group]
            error = None
            try:
                with torch.no_grad():
                    for i, ((h, kw), m) in enumerate(zip(job.inputs, job.masks, strict=True)):
                        if job.fp_inputs is not None:  # the float block on the float stream first: each X̃
                            current["float pass"] = True
                            current["reference"] = self._float_inputs(job, group, i, device, first=group is groups[0])
                            current["float pass"] = False
                        hessians.new_batch(h.shape[:-1].numel())
                        current["mask"] = m
                        job.block(h.to(device), **move_to(kw, device))
            except Exception as e:
                if job.ranks is None:
                    raise
                error = e
            finally:
                for hd in handles:
                    hd.remove()
            if job.ranks is not None:
                job.ranks.agree(error)
                solved, seen = solve_distributed(job, group, hessians)
                solutions.update(solved)
                tokens.update(seen)
                continue
            for name in group:
                solutions[name] = solve_layer(name, job.linears[name], hessians)
                hessians.release_if_done(name, solutions)
            tokens.update(hessians.tokens)
            log_unmoved(job.index, hessians.unmoved)
            del hessians
        stats = job.stats(solutions, tokens)
        job.swap_in(solutions)  # 2
        return run_block(job.block, job.inputs, device), stats  # 3

    @staticmethod
    def _float_inputs(job: BlockJob, group: list[str], i: int, device: torch.device, first: bool) -> dict:
        """``asym_alpha``: runs the float block on the float stream's batch ``i`` and returns each Linear of
        ``group``'s input there (X̃; ``None`` for a Linear that ran twice, which has no single input to pair); in
        the first group, the block's output is the next block's float stream."""
        assert job.fp_inputs is not None and job.fp_outputs is not None
        seen: dict[str, torch.Tensor | None] = {}

        def keep(name: str) -> Callable:
            def hook(_mod: nn.Module, args: tuple) -> None:
                seen[name] = None if name in seen else args[0].detach()

            return hook

        handles = [job.linears[n].register_forward_pre_hook(keep(n)) for n in group]
        try:
            out = job.block(job.fp_inputs[i].to(device), **move_to(job.inputs[i][1], device))
        finally:
            for hd in handles:
                hd.remove()
        if first:
            job.fp_outputs.append(_hidden(out).detach().cpu())
        return seen


def log_unmoved(index: int, names: list[str]) -> None:
    """``asym_alpha``: says which Linears of block ``index`` kept the plain target (no token pairing between the
    float and the quantized forward: routed MoE experts, Linears called more than once per forward)."""
    if names:
        log.info(
            "block %d: asym_alpha leaves the target of %d Linears unmoved (routed experts or Linears called more "
            "than once per forward: their float and quantized inputs are not the same tokens), e.g. %s",
            index, len(names), names[0],
        )  # fmt: skip


def solve_distributed(
    job: BlockJob, group: list[str], hessians: BlockHessians
) -> tuple[dict[str, Any], dict[str, int]]:
    """Solves ``group`` over the ranks: each Hessian (Linears that share one on any rank share it everywhere) is
    reduced onto its owner (:func:`hf_babai.engine.distributed.owners`), the owner solves its Linears, and every
    rank receives every solution with the calibration tokens behind it."""
    ranks = job.ranks
    assert ranks is not None
    ids = {name: id(hessians.acc[name]) for name in group if name in hessians.acc}
    found: list = [None] * ranks.world
    local_sets = [[n for n in group if ids.get(n) == i] for i in dict.fromkeys(ids.values())]
    plain = [n for n, i in ids.items() if i in hessians.plain]  # asym_alpha: no token pairing on this rank
    torch.distributed.all_gather_object(found, (local_sets, plain))
    shared = _union([names for rank_sets, _ in found for names in rank_sets], group)
    unpaired = {n for _, names in found for n in names}  # unmoved everywhere if unpaired on any rank
    mine: dict[str, Any] = {}
    error = None
    costs = [solve_cost(linear_dims(job.linears[s[0]])[0], [linear_dims(job.linears[n])[1] for n in s]) for s in shared]
    owned: list[list[str]] = []
    for names, owner in zip(shared, owners(costs, ranks.world), strict=True):  # every reduce first, so that the
        local = next((hessians.acc[n] for n in names if n in hessians.acc), None)  # owners then solve at once
        cross = None if local is None else hessians.cross.pop(id(local), None)
        for n in names:
            hessians.acc.pop(n, None)
        width = linear_dims(job.linears[names[0]])[0]
        total = ranks.reduce(local, width, owner)
        if job.spec.asym_alpha and not unpaired & set(names):  # every rank reduces (its own may be empty)
            cross = ranks.reduce(cross, width, owner, CrossAccumulator)
        else:
            cross = None
        if total is None:
            continue
        owned.append(names)
        if total.n:  # no token on any rank: solved as in one process, from an empty Hessian, with its warning
            for n in names:
                hessians.acc[n] = total
            if cross is not None:
                hessians.cross[id(total)] = cross
    try:
        for names in owned:
            for n in names:
                mine[n] = (solve_layer(n, job.linears[n], hessians), hessians.tokens[n])
                hessians.release_if_done(n, mine)
    except Exception as e:
        error = e
    ranks.agree(error)
    got = ranks.broadcast(mine)
    return {n: got[n][0] for n in group}, {n: got[n][1] for n in group}


def _union(sets: list[list[str]], order: list[str]) -> list[list[str]]:
    """The Linears of ``order`` grouped by shared Hessian: two names share if they shared on any rank; each group
    in module order, groups in order of their first Linear."""
    parent = {n: n for n in order}

    def root(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    for names in sets:
        for n in names[1:]:
            parent[root(n)] = root(names[0])
    groups: dict[str, list[str]] = {}
    for n in order:
        groups.setdefault(root(n), []).append(n)
    return list(groups.values())


def hessian_groups(linears: dict[str, nn.Linear], budget_gb: float) -> list[list[str]]:
    """The Linears in module order, cut into runs whose Hessians fit ``budget_gb`` (each ``in_features²`` entries
    of two float64 bins while accumulating, counted for every Linear: siblings that share one make the estimate
    conservative); a Linear over budget by itself is a group of its own."""
    budget = budget_gb * 2**30
    groups: list[list[str]] = [[]]
    used = 0.0
    for name, lin in linears.items():
        size = 16.0 * lin.weight.shape[1] ** 2
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0.0
        groups[-1].append(name)
        used += size
    return groups


class OnePass(Schedule):
    """GPTQ's "true sequential": one forward per block both calibrates and propagates, and downstream sub-layers
    (``o_proj`` after ``q/k/v``, ``down_proj`` after ``gate/up``) get Hessians of already-quantized upstream
    outputs. Needs the whole calibration set in one forward.

    1. hook every Linear: just before it runs, add its input to its Hessian (freeing the previous input's Hessian,
       whose users are all solved by then), solve it and run it on its dense quantized weight;
    2. one forward of the block on all samples: its output is the next block's input;
    3. after each Linear's own call, give it back its float weight (a dense copy per Linear would add a float
       block);
    4. solve the Linears the forward never reached (e.g. an unused expert);
    5. swap the quantized modules in.

    A Linear that runs twice in one forward raises :class:`CalledTwice` with every float weight restored; the
    driver then runs :class:`TwoPass` on that block.

    ``asym_alpha``: before step 1, one forward of the float block on the float stream keeps each Linear's input
    there (X̃, for its cross term) and gives the next block's float stream; so the schedule costs two forwards per
    block, as the two-pass one does without ``asym_alpha``."""

    name = "one pass"

    def run(self, job: BlockJob) -> tuple[list[torch.Tensor], BlockStats]:
        device = execution_device(job.block)
        hessians = BlockHessians(job.spec)
        fmt = get_format(job.spec.format)
        solutions: dict[str, Any] = {}
        originals: dict[str, torch.Tensor] = {}
        mask = job.masks[0]
        hessians.new_batch(job.inputs[0][0].shape[:-1].numel())
        references = None if job.fp_inputs is None else self._float_inputs(job, device)

        def make_hooks(name: str) -> tuple[Callable, Callable]:
            def quantize(mod: nn.Linear, args: tuple) -> None:  # 1
                if name in solutions:
                    raise CalledTwice(name)
                reference = None if references is None else references.pop(name, None)  # freed once used
                hessians.accumulate(name, args[0], mask, streaming=True, reference=reference)
                solutions[name] = solve_layer(name, mod, hessians)
                originals[name] = mod.weight.data
                mod.weight.data = fmt.dense(solutions[name], job.spec).to(mod.weight.dtype)

            def restore(mod: nn.Linear, _args: tuple, _out: torch.Tensor) -> None:  # 3
                mod.weight.data = originals[name]

            return quantize, restore

        handles = []
        for name, lin in job.linears.items():
            pre, post = make_hooks(name)
            handles += [lin.register_forward_pre_hook(pre), lin.register_forward_hook(post)]
        try:
            out = run_block(job.block, job.inputs[:1], device)  # 2
        except CalledTwice:
            for name, w in originals.items():
                job.linears[name].weight.data = w
            raise
        finally:
            for h in handles:
                h.remove()
        for name, lin in job.linears.items():  # 4
            if name not in solutions:
                solutions[name] = solve_layer(name, lin, hessians)
        log_unmoved(job.index, hessians.unmoved)
        stats = job.stats(solutions, hessians.tokens)
        job.swap_in(solutions)  # 5
        return out, stats

    @staticmethod
    def _float_inputs(job: BlockJob, device: torch.device) -> dict[str, torch.Tensor]:
        """``asym_alpha``: the float block's forward on the float stream (one batch, as the quantizing forward):
        each Linear's input there (X̃), and the block's output as the next block's float stream."""
        seen: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Callable:
            def hook(_mod: nn.Module, args: tuple) -> None:
                if name in seen:
                    raise CalledTwice(name)
                seen[name] = args[0].detach().cpu()  # beside the block's activations, off an accelerator

            return hook

        assert job.fp_inputs is not None
        handles = [lin.register_forward_pre_hook(keep(n)) for n, lin in job.linears.items()]
        try:
            job.fp_outputs = run_block(job.block, [(job.fp_inputs[0], job.inputs[0][1])], device)
        finally:
            for hd in handles:
                hd.remove()
        return seen


def run_schedule(schedule: Schedule, job: BlockJob) -> tuple[list[torch.Tensor] | None, BlockStats]:
    """``schedule.run(job)``, falling back to :class:`TwoPass` for a block whose Linear runs twice per forward.

    A function of its own so that everything a block's solve built (Hessians, factors: ~200 MB each for a 5k-wide
    layer) is unreachable once it returns, before the driver frees memory."""
    try:
        return schedule.run(job)
    except CalledTwice as e:
        log.warning("block %d: %s runs twice per forward; this block uses the two-pass schedule", job.index, e)
        return TwoPass().run(job)


def schedule_for(spec: QuantSpec, one_pass: bool) -> Schedule:
    if spec.method == "rtn":
        return RoundToNearest()
    return OnePass() if one_pass else TwoPass()
