"""Quantizing on several processes with torch.distributed: who calibrates what, who solves what, what is sent.

Every rank holds the whole model (as under DDP) and runs the calibration forwards for its contiguous share of the
samples. For each Hessian of a block, the ranks' partial sums are reduced onto one owner rank, chosen so that every
rank gets about the same solve cost (:func:`solve_cost`: factoring a ``K``-wide Hessian, then the per-weight work;
Linears that share a Hessian are solved by the same owner, from one factor). Owners solve and broadcast the
results; every rank swaps them in and propagates its own samples through the quantized block.

The result equals the single-process run's, bit for bit: each rank's batches are forwarded exactly as one process
would forward them (a sample's activations do not depend on which other samples share its batch), and the
Hessian sums are exact (:mod:`hf_babai.solver.hessian`), so neither the split nor the order of the reduction can
change them. ``asym_alpha`` runs the same way: each rank carries the float stream of its own samples, and the
cross terms, exact sums too, are reduced onto the owners beside the Hessians. The same code runs on gloo (CPU)
and NCCL (GPU); only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..solver import HessianAccumulator

log = logging.getLogger(__name__)


@dataclass
class Ranks:
    """This process's place in the initialized process group, and the tensor bytes it has sent (Hessian bins to
    their owners, solutions to every other rank)."""

    rank: int
    world: int
    device: torch.device  # where collectives' tensors live: CPU for gloo, this rank's GPU for NCCL
    bytes_sent: int = 0

    @classmethod
    def current(cls) -> Ranks | None:
        """The initialized default process group, or ``None`` (a single-process run)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        dist = torch.distributed
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` calibration samples."""
        if n < self.world:
            raise ValueError(
                f"{n} calibration samples cannot be shared by {self.world} ranks: use at least one sample per rank"
            )
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def agree(self, error: BaseException | None) -> None:
        """Stops every rank with the same message when any rank failed (called where all ranks meet, so that no
        rank waits forever in a collective for one that already gave up)."""
        found: list = [None] * self.world
        torch.distributed.all_gather_object(found, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, msg) for r, msg in enumerate(found) if msg is not None]
        if failed:
            if error is not None:
                raise error
            r, msg = failed[0]
            raise RuntimeError(f"rank {r} failed: {msg}")

    def reduce(
        self, acc: HessianAccumulator | None, in_features: int, owner: int, kind: type = HessianAccumulator
    ) -> HessianAccumulator | None:
        """The sum of every rank's partial Hessian (or other binned sum of that ``kind``: ``asym_alpha``'s
        :class:`~hf_babai.solver.CrossAccumulator`), on ``owner`` (``None`` elsewhere). The bins are first moved
        to the largest row levels any rank reached, so the summed bins are exact whatever order the backend adds
        them in."""
        dist = torch.distributed
        acc = acc if acc is not None else kind(in_features)
        counts = torch.tensor([acc.n, acc.summands], dtype=torch.int64, device=self.device)
        dist.all_reduce(counts)
        level = acc.level.to(self.device, torch.int32)  # gloo has no int8 MAX
        dist.all_reduce(level, op=dist.ReduceOp.MAX)
        self.bytes_sent += level.numel() * level.element_size()
        acc.align(level.to(acc.device, torch.int8))
        for t in (acc.high, acc.low):
            buf = t.to(self.device)
            dist.reduce(buf, dst=owner)
            if self.rank == owner and buf is not t:
                t.copy_(buf)
            if self.rank != owner:
                self.bytes_sent += buf.numel() * buf.element_size()
        if self.rank != owner:
            return None
        acc.n, acc.summands = int(counts[0]), int(counts[1])
        return acc

    def broadcast(self, mine: dict[str, Any]) -> dict[str, Any]:
        """Every rank's ``mine`` (its solved layers), merged on every rank; tensors travel through CPU."""
        out: dict[str, Any] = {}
        self.bytes_sent += _tensor_bytes(mine) * (self.world - 1)
        for r in range(self.world):
            box = [_to_cpu(mine) if r == self.rank else None]
            torch.distributed.broadcast_object_list(box, src=r, device=self.device)
            out.update(box[0])
        return out


def owners(costs: list[float], world: int) -> list[int]:
    """Owner rank of each job: longest first, each to the least loaded rank (ties: the lower job and rank index),
    so that every rank computes the same assignment."""
    load = [0.0] * world
    out = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[j] = r
        load[r] += costs[j]
    return out


#: Solve time per weight over factoring time per ``K³``, fitted to the engine's per-layer solve times on
#: Qwen2.5-0.5B (one CPU thread, ``bench/distributed.py``, ``docs/distributed.md``): about 1.1e-6 s per weight
#: (the default scale search and nearest-plane sweep) and 3.9e-12 s per K³, so the per-weight work dominates
#: up to the widest layers of today's models.
WEIGHT_COST = 3e5


def solve_cost(in_features: int, out_features: list[int]) -> float:
    """Relative cost of solving Linears that share one ``in_features``-wide Hessian: one factorization (``K³``)
    and the per-weight work of each Linear (scale search and nearest-plane sweep, :data:`WEIGHT_COST` each)."""
    k = float(in_features)
    return k**3 + WEIGHT_COST * k * sum(out_features)


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor on CPU (inside dicts, lists, tuples and dataclasses), so that a broadcast does
    not pin a result to the sender's GPU index."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to_cpu(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors inside ``obj`` (what a broadcast of it carries, besides a little pickling)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0
