"""Hessian capture: accumulating ``H = (2/n) Σ XᵀX`` for the Linears of a block from their inputs.

:class:`BlockHessians` is the bookkeeping the schedules use (siblings reading one tensor share one accumulator and
one factorization; each is freed as soon as its users are solved). :func:`capture_hessians` is the same capture as
one public call, for benchmarks and analysis scripts that need a block's Hessians without quantizing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch import nn

from ..solver import CrossAccumulator, HessianAccumulator, HessianFactor
from ..spec import QuantSpec
from .policy import factor_layer

log = logging.getLogger(__name__)


class BlockHessians:
    """The accumulators of one block's Linears, and their factors."""

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.acc: dict[str, HessianAccumulator] = {}
        self.factors: dict[int, HessianFactor] = {}  # by id() of the accumulator they factor
        self.tokens: dict[str, int] = {}  # calibration tokens behind each factored Linear's Hessian
        self._last: tuple[torch.Tensor, int, HessianAccumulator] | None = None
        # asym_alpha: Σ (X̃ − X)ᵀ X of each Linear (X̃ its input in the float model), by id() of its Hessian's
        # accumulator: shared like the Hessian; and the accumulators whose Linears have no token pairing
        self.cross: dict[int, CrossAccumulator] = {}
        self.plain: dict[int, str] = {}
        self.unmoved: list[str] = []  # the Linears solved without a cross term while asym_alpha is on
        self.batch_tokens = 0

    def accumulate(
        self,
        name: str,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        streaming: bool = False,
        reference: torch.Tensor | None = None,
    ) -> None:
        """Adds ``x`` to ``name``'s Hessian. Siblings called back to back on the very same tensor object
        (``q/k/v``, ``gate/up``) share one accumulator; only the last input is remembered, by identity
        (a freed tensor's address can be reused, so addresses alone would alias unrelated inputs).

        ``streaming`` (the one-pass schedule, where each Linear is solved in its own hook): a new input means
        every user of the previous one is solved, so that Hessian and its factor are freed now rather than at
        the end of the block (each is K² float64 words: ~200 MB for a 5k-wide down_proj).

        ``reference`` (``asym_alpha``): the same Linear's input in the float model, for the cross term
        (:meth:`cross_of`) of GPTAQ's asymmetric target (see :meth:`_add_cross`)."""
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:
            self.acc.setdefault(name, last[2])
            return
        if streaming and last is not None:
            self.release(last[2])
        acc = self.acc.setdefault(name, HessianAccumulator(x.shape[-1]))
        m = mask if mask is not None and mask.shape == x.shape[:-1] else None
        acc.add(x, m)
        if self.spec.asym_alpha:
            self._add_cross(name, acc, x, reference, m)
        self._last = (x, x._version, acc)

    def _add_cross(
        self,
        name: str,
        acc: HessianAccumulator,
        x: torch.Tensor,
        reference: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> None:
        """Adds ``(X̃ − X)ᵀ X`` to the cross term of ``acc``'s Linears, where the rows of ``X̃`` and ``X`` are the
        same tokens: the Linear ran once in each model's forward on every token of the batch. A routed MoE expert
        (its tokens are the router's choice, which differs between the two models) or a Linear called more than
        once per forward has no such pairing; its target stays unmoved for the whole block (``plain``), and the
        schedule logs how many did."""
        key = id(acc)
        if key in self.plain:
            return
        paired = reference is not None and reference.shape == x.shape and x.shape[:-1].numel() == self.batch_tokens
        if not paired:
            self.plain[key] = name
            self.cross.pop(key, None)
            return
        cross = self.cross.setdefault(key, CrossAccumulator(x.shape[-1]))
        ref = reference.to(x.device)
        cross.add(ref.float() - x.float(), x, mask)  # the difference in float32, whatever the dtype

    def cross_of(self, name: str) -> torch.Tensor | None:
        """``(2/n) Σ (X̃ − X)ᵀ X`` of ``name`` (scaled like its Hessian), if it was accumulated with a ``reference``
        (``None`` with ``asym_alpha`` on: the Linear is listed in ``unmoved``)."""
        acc = self.acc.get(name)
        cross = None if acc is None else self.cross.get(id(acc))
        if cross is None and self.spec.asym_alpha:
            self.unmoved.append(name)
        return None if cross is None else cross.finalize()

    def new_batch(self, tokens: int = 0) -> None:
        """A new calibration batch of ``tokens`` token positions (what a Linear's input covers when it runs on
        every token)."""
        self._last = None
        self.batch_tokens = tokens

    def release(self, acc: HessianAccumulator) -> None:
        """Drops ``acc`` and its factor."""
        self.factors.pop(id(acc), None)
        self.cross.pop(id(acc), None)
        self.plain.pop(id(acc), None)
        for n in [n for n, a in self.acc.items() if a is acc]:
            del self.acc[n]
        if self._last is not None and self._last[2] is acc:
            self._last = None

    def release_if_done(self, name: str, solved: set[str] | dict) -> None:
        """Frees ``name``'s Hessian once every Linear that shares it is in ``solved``."""
        acc = self.acc.get(name)
        if acc is not None and all(n in solved for n, a in self.acc.items() if a is acc):
            self.release(acc)

    def factor(self, name: str, in_features: int) -> tuple[HessianFactor, Callable[[], torch.Tensor]]:
        """``(factor, H)`` for ``name``, factoring a Hessian its siblings share only once."""
        acc = self.acc.get(name)
        if acc is None:
            log.warning(
                "%s received no calibration tokens (an MoE expert the router never chose, or a Linear the forward "
                "never calls); its Hessian is empty, so it is rounded to nearest (quant_log.csv: tokens = 0)",
                name,
            )
            acc = HessianAccumulator(in_features)
            self.tokens[name] = 0
            return factor_layer(acc, self.spec), acc.finalize
        self.tokens[name] = acc.n
        f = self.factors.get(id(acc))
        if f is None:
            f = self.factors[id(acc)] = factor_layer(acc, self.spec)
        return f, acc.finalize


class _Stop(Exception):
    """Raised once the block of interest has run: the rest of the model adds nothing to its Hessians."""


def capture_hessians(
    model: nn.Module, block: nn.Module, linears: dict[str, nn.Linear], input_ids: torch.Tensor, batch_size: int = 1
) -> dict[str, torch.Tensor]:
    """``{name: H}`` (float64) for each of ``linears`` (Linears of ``block``) from ``model`` as it is, on
    ``input_ids [n, T]``, ``batch_size`` windows per forward; each forward stops once ``block`` has run."""
    accs = {n: HessianAccumulator(lin.in_features) for n, lin in linears.items()}

    def stop(*_):
        raise _Stop

    hooks = [lin.register_forward_pre_hook(lambda m, a, n=n: accs[n].add(a[0].detach())) for n, lin in linears.items()]
    hooks.append(block.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for i in range(0, input_ids.shape[0], batch_size):
                with contextlib.suppress(_Stop):
                    model(input_ids[i : i + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: acc.finalize() for n, acc in accs.items()}
