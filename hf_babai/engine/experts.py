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
Detection is by that contract, so the engine needs no transformers import and no per-architecture table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..spec import EXPERT_CALIBRATION


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module of transformers' experts contract with fused 3-D weights whose every
    parameter this module knows how to unfuse, called through the contract's forward (anything else is left
    alone, and the float-weight check then names its weights)."""
    if isinstance(module, UnfusedExperts) or not all(
        hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts")
    ):
        return False
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
    return weights_ok and dispatches and own == names and not getattr(module, "_is_expert_parallel", False)


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
        self.num_experts = int(fused.num_experts)
        self.has_gate = bool(fused.has_gate)
        self.is_concatenated = bool(getattr(fused, "is_concatenated", True))
        self.calibration = "routed"
        first = fused.gate_up_proj if self.has_gate else fused.up_proj
        down = fused.down_proj
        t = bool(fused.is_transposed)
        hidden = down.shape[-1] if t else down.shape[-2]
        inner = down.shape[-2] if t else down.shape[-1]
        # the module's own gating and activation, without keeping its 3-D weights alive through a bound method
        gate_fn = getattr(type(fused), "_apply_gate", None)
        self._fused_shapes = {
            n: (tuple(t.shape), t.dtype) for n, t in fused.named_parameters(recurse=False)
        }  # for model code that still names them (see __getattr__)
        self._shell = _Shell(fused)
        self._gate_fn = gate_fn
        if getattr(fused, "has_post_expert_norm", False):
            self.post_expert_norm = fused.post_expert_norm
        for e in range(self.num_experts):
            self.add_module(
                str(e), ExpertMLP(hidden, inner, self.has_gate, bool(fused.has_bias), down.dtype, down.device)
            )
        if copy_weights and down.device.type != "meta":
            self._copy(fused, first, down, t)

    @torch.no_grad()
    def _copy(self, fused: nn.Module, first: torch.Tensor, down: torch.Tensor, transposed: bool) -> None:
        for e in range(self.num_experts):
            mlp = self[e]
            w1 = first[e].T if transposed else first[e]  # [2I or I, H]
            wd = down[e].T if transposed else down[e]  # [H, I]
            b1 = (fused.gate_up_proj_bias if self.has_gate else fused.up_proj_bias)[e] if fused.has_bias else None
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
            if fused.has_bias:
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
        fused = torch.cat([gate, up], dim=-1) if self.is_concatenated else torch.stack([gate, up], -1).flatten(-2)
        return self._gate_fn(self._shell, fused)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        out = self[e](x, self.activate)
        if hasattr(self, "post_expert_norm"):
            out = self.post_expert_norm(out)
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
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
