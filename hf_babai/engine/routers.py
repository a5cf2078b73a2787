"""MoE routers: recognised by structure, kept float by default, quantized as Linears on request.

A router maps each token's hidden state to one score per expert (``[E, H]``). It is tiny next to the experts and
decides where every token goes, so a small error in it can move tokens to other experts: it stays float unless
the user sets ``quantize_router``. Routers come in two shapes in transformers 5: a module holding the ``weight``
itself and calling ``F.linear(x, self.weight)`` in a forward of its own (softmax, top-k, bias corrections:
Mixtral, Qwen-MoE, DeepSeek-V3, gpt-oss), or a plain ``nn.Linear`` (JetMoE's and DBRX's ``router.layer``,
AfMoE's ``router.gate``, Qwen-MoE's ``shared_expert_gate``). :func:`router_linears` names the Linears of both kinds
so that the engine leaves them out by default; :func:`expose_routers` gives routers of the first kind their
``weight`` as a child Linear, so that with the option set they are solved like any Linear of the block, on the
Hessian of the router's own input (every token of the block), and stored in the run's format.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
from torch import nn

from ..formats import format_of

ROUTER_LEAVES = frozenset({"gate", "router"})
SHARED_EXPERT_GATES = frozenset({"shared_expert_gate"})


def is_router(name: str, module: nn.Module) -> bool:
    """Whether a module holding weights of its own (full name ``name``) looks like a router, by name or class:
    ``mlp.gate``, ``mlp.router``, ``*Router``, ``*TopKGating``, ``*Gate`` classes. Broad on purpose: it only
    names weights that are nothing else (the float-weight report); what the engine leaves out or quantizes as a
    router is decided by the stricter :func:`router_modules`."""
    leaf = name.rsplit(".", 1)[-1]
    cls = type(module).__name__.lower()
    return "router" in cls or leaf in ROUTER_LEAVES or cls.endswith("gate") or "topk" in cls


def router_modules(root: nn.Module) -> dict[str, nn.Module]:
    """The modules under ``root`` that route tokens to experts, by name: a ``*Router`` or ``*TopK*``
    class, or a module named ``gate``/``router`` beside an ``experts`` module (a gate of a linear-attention layer
    is not one)."""
    out: dict[str, nn.Module] = {}
    for pname, parent in root.named_modules():
        for leaf, mod in parent.named_children():
            cls = type(mod).__name__.lower()
            named = "router" in cls or "topk" in cls
            if named or (leaf in ROUTER_LEAVES and hasattr(parent, "experts")):
                out[f"{pname}.{leaf}" if pname else leaf] = mod
    return out


def router_linears(root: nn.Module) -> set[str]:
    """Names (relative to ``root``) of the Linears that route tokens: a router that is a Linear, a Linear held by a
    router module (including the one :func:`expose_routers` creates), and a shared expert's scalar gate
    (``shared_expert_gate``). Quantized modules standing where such a Linear stood are named too."""
    out: set[str] = set()
    for name, mod in router_modules(root).items():
        if _linear_like(mod):
            out.add(name)
        else:
            out |= {f"{name}.{n}" for n, child in mod.named_modules() if n and _linear_like(child)}
    for name, mod in root.named_modules():
        if name.rsplit(".", 1)[-1] in SHARED_EXPERT_GATES and _linear_like(mod):
            out.add(name)
    return out


def _linear_like(module: nn.Module) -> bool:
    """A Linear, or the quantized module standing where one stood (the registered formats say which)."""
    return isinstance(module, nn.Linear) or format_of(module) is not None


class _WeightInLinear:
    """Mixin for a router whose ``[E, H]`` weight moved into its child ``linear``: ``weight`` reads it from there
    (a quantized module answers with its dequantized weight), so the router's own forward runs unchanged. While
    the engine has hooks on the Linear (calibration), the forward also calls it on the router's input, so the
    Hessian and the one-pass solve see exactly what the router multiplies; otherwise it adds nothing."""

    linear: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        lin = self.linear
        if lin._forward_pre_hooks or lin._forward_hooks:
            lin(hidden_states)
        return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]


_CLASSES: dict[type, type] = {}


def _with_weight_in_linear(cls: type) -> type:
    """``cls`` with :class:`_WeightInLinear` in front, same name (``isinstance`` checks of model code still hold)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (_WeightInLinear, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def expose_routers(root: nn.Module) -> list[str]:
    """Moves the ``[E, H]`` weight of every router module under ``root`` that holds one itself into a child
    ``nn.Linear`` named ``linear`` (the same tensor, meta included); its other tensors (a bias, score
    corrections) stay where they were. Returns the routers' names. Idempotent."""
    done = []
    for name, mod in router_modules(root).items():
        if isinstance(mod, (nn.Linear, _WeightInLinear)):
            continue
        w = mod._parameters.get("weight")
        if w is None or w.dim() != 2 or not w.dtype.is_floating_point or "linear" in mod._modules:
            continue
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
        del mod._parameters["weight"]
        lin.weight = w
        mod.__class__ = _with_weight_in_linear(type(mod))
        if "_old_forward" in mod.__dict__:  # an accelerate hook calls the forward it saved: make it this class's
            mod._old_forward = MethodType(type(mod).forward, mod)
        mod.add_module("linear", lin)
        done.append(name)
    return done
