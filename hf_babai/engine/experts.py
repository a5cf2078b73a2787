"""Mixture-of-experts layers: fused 3-D expert weights as one ``nn.Linear`` per expert matrix.

transformers 5 stores the experts of an MoE layer as 3-D parameters of one module (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``, optionally transposed, with biases in gpt-oss), not as Linears, so a Linear-based
quantizer leaves them float. Every such class is declared through transformers' experts interface, which fixes
a contract that any experts implementation must follow: the flags ``has_gate``, ``has_bias``, ``is_transposed``,
``is_concatenated`` (``[gate; up]`` or interleaved rows), ``has_post_expert_norm``, the gating function
``_apply_gate`` and ``act_fn``, and the call ``experts(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])``.

:func:`unfuse_experts` replaces each such module by :class:`UnfusedExperts`, which holds expert ``e``'s matrices as
``e.gate_proj``, ``e.up_proj`` and ``e.down_proj`` Linears and computes the same function with the module's own
gating. From there the engine treats them like any Linear (one Hessian per expert from the tokens routed to it;
``gate``/``up`` share it), the loader rebuilds the same structure before reading a checkpoint, and the saved
names (``mlp.experts.3.gate_proj.*``) are the per-expert names that Qwen-MoE checkpoints and serving engines use.
Detection is by that contract, so the engine needs no transformers import and no per-architecture table. One
family outside the interface is recognised by its structure: Llama 4, whose experts take every token, each
pre-scaled by its router score (``call="stacked"``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from ..spec import EXPERT_CALIBRATION


def _contract(module: nn.Module) -> dict | None:
    """The layout flags of an experts module of transformers' experts interface whose every parameter is one this
    module unfuses and whose forward is the interface's dispatcher; ``None`` otherwise."""
    if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts")):
        return None
    first = "gate_up_proj" if module.has_gate else "up_proj"
    names = {first, "down_proj"}
    if module.has_bias:
        names |= {f"{first}_bias", "down_proj_bias"}
    own = {n for n, _ in module.named_parameters(recurse=False)}
    weights_ok = all(
        isinstance(getattr(module, n, None), torch.Tensor) and getattr(module, n).dim() == 3
        for n in (first, "down_proj")
    )
    # the forward must be the interface's dispatcher (it wraps the class's own): a subclass that overrides it
    # (Ergo normalises per route around it) computes something this module does not reproduce
    dispatches = hasattr(type(module).forward, "__wrapped__")
    if not (weights_ok and dispatches and own == names) or getattr(module, "_is_expert_parallel", False):
        return None
    return {
        "call": "routed",
        "has_gate": bool(module.has_gate),
        "has_bias": bool(module.has_bias),
        "is_transposed": bool(module.is_transposed),
        "is_concatenated": bool(getattr(module, "is_concatenated", True)),
        "post_norm": bool(getattr(module, "has_post_expert_norm", False)),
    }


def _stacked(module: nn.Module) -> dict | None:
    """Llama 4's experts, outside the interface: ``experts(x [E·N, H])`` where block ``e`` of ``x`` is every token
    already scaled by its router score for expert ``e`` (0 where not routed), ``gate_up_proj [E, H, 2I]``
    (``[gate | up]`` columns), ``down_proj [E, I, H]``, ``act(gate) · up``, no bias. Recognised by that structure:
    exactly those two 3-D parameters, an ``act_fn`` and a forward of the hidden states alone."""
    own = dict(module.named_parameters(recurse=False))
    if set(own) != {"gate_up_proj", "down_proj"} or hasattr(module, "has_gate") or not hasattr(module, "act_fn"):
        return None
    gu, down = own["gate_up_proj"], own["down_proj"]
    if gu.dim() != 3 or down.dim() != 3 or gu.shape[0] != down.shape[0]:
        return None
    if not (gu.shape[1] == down.shape[2] and gu.shape[2] == 2 * down.shape[1]):
        return None
    params = list(inspect.signature(type(module).forward).parameters)
    if params != ["self", "hidden_states"]:
        return None
    return {
        "call": "stacked",
        "has_gate": True,
        "has_bias": False,
        "is_transposed": True,
        "is_concatenated": True,
        "post_norm": False,
        "num_experts": gu.shape[0],
    }


def experts_layout(module: nn.Module) -> dict | None:
    """How ``module`` stores and calls fused 3-D experts (see the module docstring), or ``None`` if it is not an
    experts module this module can unfuse."""
    if isinstance(module, UnfusedExperts):
        return None
    return _contract(module) or _stacked(module)


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds fused 3-D experts that :class:`UnfusedExperts` reproduces (anything else is left
    alone, and the float-weight check then names its weights)."""
    return experts_layout(module) is not None


class ExpertMLP(nn.Module):
    """One expert: ``down(activate(up(x), gate(x)))``, where ``activate`` is the owning module's gating on the two
    (rebuilt into the fused ``gate_up`` layout it expects) or, for ungated experts, its activation on ``up(x)``."""

    def __init__(self, hidden: int, inner: int, gated: bool, bias: bool, dtype: torch.dtype, device) -> None:
        super().__init__()
        kw = {"bias": bias, "dtype": dtype, "device": device}
        if gated:
            self.gate_proj = nn.Linear(hidden, inner, **kw)
        self.up_proj = nn.Linear(hidden, inner, **kw)
        self.down_proj = nn.Linear(inner, hidden, **kw)

    def forward(self, x: torch.Tensor, activate: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]):
        gate = self.gate_proj(x) if hasattr(self, "gate_proj") else None
        return self.down_proj(activate(self.up_proj(x), gate))


class UnfusedExperts(nn.Module):
    """The experts of one MoE layer as :class:`ExpertMLP` children named ``"0" … "E-1"``, computing what the fused
    module computed (same routing, weighting and gating). ``calibration="all"`` runs every expert on every token
    (so each expert's Hessian sees all of them) while the output still follows the router; the engine sets it
    only during calibration forwards."""

    def __init__(self, fused: nn.Module, *, copy_weights: bool = True) -> None:
        super().__init__()
        layout = experts_layout(fused)
        if layout is None:
            raise ValueError(f"{type(fused).__name__} is not an experts module hf_babai can unfuse")
        self.num_experts = int(layout.get("num_experts", getattr(fused, "num_experts", 0)))
        self.call = layout["call"]
        self.has_gate = layout["has_gate"]
        self.has_bias = layout["has_bias"]
        self.is_concatenated = layout["is_concatenated"]
        self.calibration = "routed"
        first = fused.gate_up_proj if self.has_gate else fused.up_proj
        down = fused.down_proj
        t = layout["is_transposed"]
        hidden = down.shape[-1] if t else down.shape[-2]
        inner = down.shape[-2] if t else down.shape[-1]
        self.hidden_size = hidden
        # the module's own gating, without keeping its 3-D weights alive through a bound method
        self._gate_fn = getattr(type(fused), "_apply_gate", None)
        self._fused_shapes = {
            n: (tuple(p.shape), p.dtype) for n, p in fused.named_parameters(recurse=False)
        }  # for model code that still names them (see __getattr__)
        self._shell = _Shell(fused)
        if layout["post_norm"]:
            self.post_expert_norm = fused.post_expert_norm
        for e in range(self.num_experts):
            self.add_module(str(e), ExpertMLP(hidden, inner, self.has_gate, self.has_bias, down.dtype, down.device))
        if copy_weights and down.device.type != "meta":
            self._copy(fused, first, down, t)

    @torch.no_grad()
    def _copy(self, fused: nn.Module, first: torch.Tensor, down: torch.Tensor, transposed: bool) -> None:
        for e in range(self.num_experts):
            mlp = self[e]
            w1 = first[e].T if transposed else first[e]  # [2I or I, H]
            wd = down[e].T if transposed else down[e]  # [H, I]
            b1 = (fused.gate_up_proj_bias if self.has_gate else fused.up_proj_bias)[e] if self.has_bias else None
            if self.has_gate:
                gate, up = self._split(w1)
                mlp.gate_proj.weight.copy_(gate)
                mlp.up_proj.weight.copy_(up)
                if b1 is not None:
                    bg, bu = self._split(b1)
                    mlp.gate_proj.bias.copy_(bg)
                    mlp.up_proj.bias.copy_(bu)
            else:
                mlp.up_proj.weight.copy_(w1)
                if b1 is not None:
                    mlp.up_proj.bias.copy_(b1)
            mlp.down_proj.weight.copy_(wd)
            if self.has_bias:
                mlp.down_proj.bias.copy_(fused.down_proj_bias[e])

    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate, up)`` rows of a fused ``gate_up`` tensor (dim 0)."""
        if self.is_concatenated:
            return t.chunk(2, dim=0)
        return t[0::2], t[1::2]

    def __getitem__(self, e: int) -> ExpertMLP:
        return getattr(self, str(e))

    def __getattr__(self, name: str):
        """The fused parameters' names answer with a placeholder on the meta device, marked initialised: model code
        addresses them outside the forward (transformers' ``_init_weights`` re-initialises ``experts.gate_up_proj``
        of every MoE block on load, which is skipped for marked tensors). Computing with one fails loudly."""
        shapes = self.__dict__.get("_fused_shapes", {})
        if name in shapes:
            shape, dtype = shapes[name]
            t = torch.empty(shape, dtype=dtype, device="meta")
            t._is_hf_initialized = True
            return t
        return super().__getattr__(name)

    def activate(self, up: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """The fused module's gating on ``gate``/``up`` (rebuilt into its ``gate_up`` layout), or its activation."""
        if gate is None:
            return self._shell.act_fn(up)
        if self._gate_fn is None:  # no gating of its own (Llama 4): act(gate) · up
            return self._shell.act_fn(gate) * up
        fused = torch.cat([gate, up], dim=-1) if self.is_concatenated else torch.stack([gate, up], -1).flatten(-2)
        return self._gate_fn(self._shell, fused)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        out = self[e](x, self.activate)
        if hasattr(self, "post_expert_norm"):
            out = self.post_expert_norm(out)
        return out

    def forward(self, hidden_states: torch.Tensor, *routing: torch.Tensor) -> torch.Tensor:
        if self.call == "stacked":
            return self._stacked_forward(hidden_states)
        return self._routed_forward(hidden_states, *routing)

    def _stacked_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Llama 4: block ``e`` of the input holds every token scaled by its score for expert ``e``; the rows of
        tokens not routed there are zero and give zero (no bias), so only the others run (and reach the Hessians:
        there, ``expert_calibration="all"`` has nothing more to add, the unrouted tokens' inputs being zero)."""
        x = hidden_states.view(self.num_experts, -1, self.hidden_size)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            rows = torch.where(x[e].ne(0).any(-1))[0]
            if rows.numel():
                out[e, rows] = self._expert(e, x[e, rows]).to(out.dtype)
        return out.view(-1, self.hidden_size)

    def _routed_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        everyone = self.calibration == "all"
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)
            if not everyone and token.numel() == 0:
                continue
            # "all": every token through the expert (its Hessian sees them), only the routed ones into the output
            y = self._expert(e, hidden_states)[token] if everyone else self._expert(e, hidden_states[token])
            y = y * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class _Shell:
    """The fused module's non-weight state (``act_fn``, gating constants such as gpt-oss's ``alpha``/``limit``),
    held outside the module tree so that it adds no state-dict keys; its 3-D weights are dropped."""

    def __init__(self, fused: nn.Module) -> None:
        skip = {"gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"}
        for k, v in vars(fused).items():
            if k not in ("_parameters", "_buffers", "_modules"):
                setattr(self, k, v)
        for k, m in fused._modules.items():
            setattr(self, k, m)
        for k, b in fused._buffers.items():
            setattr(self, k, b)
        for k in skip:
            self.__dict__.pop(k, None)


def unfuse_experts(root: nn.Module) -> list[str]:
    """Replaces every fused experts module under ``root`` (see :func:`is_fused_experts`) by an
    :class:`UnfusedExperts` holding the same weights (on the meta device: holding none); returns their names."""
    found = [(n, m) for n, m in root.named_modules() if is_fused_experts(m)]
    for name, mod in found:
        new = UnfusedExperts(mod)
        parent, _, leaf = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, leaf, new)
    return [n for n, _ in found]


def set_expert_calibration(root: nn.Module, mode: str) -> None:
    """Sets how every :class:`UnfusedExperts` under ``root`` routes calibration tokens (``"routed"``: as the
    router does; ``"all"``: every token through every expert for the Hessians)."""
    if mode not in EXPERT_CALIBRATION:
        raise ValueError(f"expert_calibration={mode!r} is invalid; use one of {EXPERT_CALIBRATION}")
    for m in root.modules():
        if isinstance(m, UnfusedExperts):
            m.calibration = mode
