"""Which serving engines load a checkpoint, with which kernel, and why the others refuse it.

The rules are data (:data:`RULES`): each names the engine release and the source file it was read from, so a new
release is checked by reading that file again and editing one row. :func:`describe_checkpoint` reduces a
checkpoint's ``quantization_config`` to the few facts the rules test; :func:`servability` applies every rule;
``hf-babai info`` and :func:`hf_babai.export` print the result (:func:`format_report`).

Only weight-only int checkpoints are covered (what hf_babai writes). A babai-native checkpoint is served by
transformers with ``import hf_babai`` and by no engine; exporting it is the way to an engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RULES", "CheckpointFacts", "Rule", "Verdict", "describe_checkpoint", "format_report", "servability"]


@dataclass(frozen=True)
class CheckpointFacts:
    """What the rules look at: checkpoint ``kind`` (``compressed-tensors``, ``gptq`` or ``babai``), ``bits``,
    ``sym``, the stored ``group_sizes`` (``-1`` per channel), whether every group is whole, ``desc_act``, and
    whether it holds MoE experts (layers named ``….experts.E.…``, which engines load through a fused-MoE path with
    rules of its own)."""

    kind: str
    bits: int
    sym: bool
    group_sizes: frozenset[int]
    whole_groups: bool = True
    desc_act: bool = False
    experts: bool = False


@dataclass(frozen=True)
class Rule:
    """One loader path: which checkpoints it takes (``bits``, ``sym`` values, stored ``group_sizes`` or ``None`` for
    any) and what it needs (``needs``: a flag or a GPU, empty when it is chosen by default)."""

    engine: str
    path: str
    kind: str
    bits: tuple[int, ...]
    sym: tuple[bool, ...]
    group_sizes: tuple[int, ...] | None
    needs: str
    source: str
    whole_groups: bool = True
    desc_act: bool = False
    part: str = "linear"  # "linear": the dense layers' path; "moe": the experts' fused-MoE path

    def refusal(self, facts: CheckpointFacts) -> str | None:
        """Why this path cannot load ``facts`` (``None``: it can)."""
        if facts.kind != self.kind:
            return f"reads {self.kind} checkpoints"
        if facts.bits not in self.bits:
            return f"{facts.bits}-bit is not one of {list(self.bits)}"
        if facts.sym not in self.sym:
            return "asymmetric (zero-point) weights are not supported" if not facts.sym else "symmetric only"
        if self.group_sizes is not None and not facts.group_sizes <= set(self.group_sizes):
            bad = sorted(facts.group_sizes - set(self.group_sizes))
            return f"group size {bad} is not one of {list(self.group_sizes)}"
        if self.whole_groups and not facts.whole_groups:
            return "a partial last group (in_features not a multiple of the group size)"
        if facts.desc_act and not self.desc_act:
            return "desc_act (act-order with g_idx) is refused"
        return None


VLLM = "vLLM 0.34.0"
SGLANG = "SGLang 0.5.23"
TRANSFORMERS = "transformers 5.x"
GPTQMODEL = "GPTQModel 7.6.0"
ALL_INT = (2, 3, 4, 5, 6, 7, 8)
_V = "vllm/model_executor/"
_S = "sglang/srt/layers/quantization/"

# fmt: off
RULES: tuple[Rule, ...] = (
    # vLLM: compressed-tensors pack-quantized -> CompressedTensorsWNA16 -> choose_mp_linear_kernel (first that fits).
    Rule(VLLM, "Machete", "compressed-tensors", (4, 8), (True, False), (-1, 64, 128), "Hopper GPU (sm90)",
         _V + "kernels/linear/mixed_precision/machete.py, layers/quantization/utils/machete_utils.py"),
    Rule(VLLM, "Marlin", "compressed-tensors", (4, 8), (True,), (-1, 32, 64, 128), "",
         _V + "kernels/linear/mixed_precision/marlin.py, layers/quantization/utils/marlin_utils.py"),
    Rule(VLLM, "Marlin", "compressed-tensors", (4,), (False,), (-1, 32, 64, 128), "",
         _V + "layers/quantization/utils/marlin_utils.py (uint4 is its only zero-point type)"),
    Rule(VLLM, "Humming", "compressed-tensors", ALL_INT, (True, False), None, "",
         _V + "kernels/linear/mixed_precision/humming.py (humming-kernels is a vLLM dependency)"),
    # vLLM: the experts of an MoE go to the fused-MoE method (2-8 bits, pack-quantized, group size dividing the
    # hidden and the per-partition intermediate size).
    Rule(VLLM, "WNA16 fused MoE", "compressed-tensors", ALL_INT, (True, False), None, "",
         _V + "layers/quantization/compressed_tensors/compressed_tensors_moe/compressed_tensors_moe.py, "
         "compressed_tensors_moe_wna16.py", part="moe"),
    # vLLM: GPTQ checkpoints -> AutoGPTQConfig (Marlin) at 4/8-bit symmetric; anything else only through humming.
    Rule(VLLM, "Marlin (auto_gptq)", "gptq", (4, 8), (True,), (-1, 32, 64, 128), "",
         _V + "layers/quantization/auto_gptq.py (TYPE_MAP, scales_and_zp_size), utils/gptq_utils.py"),
    Rule(VLLM, "Humming", "gptq", ALL_INT, (True, False), None, "--quantization humming",
         _V + "layers/quantization/humming.py (override_quantization_method)"),
    # SGLang: compressed-tensors WNA16 and GPTQ through Marlin at 4/8-bit; the rest only through humming.
    Rule(SGLANG, "Marlin", "compressed-tensors", (4, 8), (True,), (-1, 32, 64, 128), "",
         _S + "compressed_tensors/schemes/compressed_tensors_wNa16.py (WNA16_SUPPORTED_TYPES_MAP)"),
    Rule(SGLANG, "Marlin", "compressed-tensors", (4,), (False,), (-1, 32, 64, 128), "",
         _S + "marlin_utils.py (uint4 is its only zero-point type)"),
    Rule(SGLANG, "gptq_marlin", "gptq", (4, 8), (True,), (-1, 32, 64, 128), "", _S + "gptq/gptq.py (TYPE_MAP)"),
    Rule(SGLANG, "Humming", "compressed-tensors", ALL_INT, (True, False), None, "--quantization humming",
         _S + "humming.py (override_quantization_method)"),
    Rule(SGLANG, "Humming", "gptq", ALL_INT, (True, False), None, "--quantization humming",
         _S + "humming.py (override_quantization_method)"),
    # transformers: compressed-tensors decompresses to dense weights (integration_tests/test_serving_loaders.py).
    Rule(TRANSFORMERS, "compressed-tensors", "compressed-tensors", (2, 4, 8), (True,), None,
         "pip install compressed-tensors", "compressed_tensors/compressors/pack_quantized/base.py"),
    Rule(TRANSFORMERS, "compressed-tensors", "compressed-tensors", (2, 4, 8), (False,), None,
         "pip install compressed-tensors==0.17.0", "transformers 5.25 with compressed-tensors 0.18-0.20.1 refuses "
         "packed zero points, llm-compressor's checkpoints too (tested)"),
    Rule(TRANSFORMERS, "compressed-tensors", "compressed-tensors", (3, 5, 6, 7), (True,), None,
         "pip install compressed-tensors>=0.18", "compressed_tensors/compressors/pack_quantized/helpers.py "
         "(dense packing since 0.18.0)"),
    Rule(TRANSFORMERS, "compressed-tensors", "compressed-tensors", (3, 5, 6, 7), (False,), None,
         "transformers 5.17 with compressed-tensors 0.19.0", "both of the above (tested in llm-compressor's pins)"),
    Rule(TRANSFORMERS, "GPTQ (optimum + gptqmodel)", "gptq", (2, 3, 4, 8), (True, False), None,
         "pip install optimum gptqmodel", "transformers/quantizers/quantizer_gptq.py, then GPTQModel's kernels",
         whole_groups=False),
    Rule(TRANSFORMERS, "hf_babai module", "babai", (2, 3, 4, 8), (True, False), None, "import hf_babai",
         "hf_babai/hf/quantizer.py", whole_groups=False),
    Rule(TRANSFORMERS, "hf_babai experts", "babai", (2, 3, 4, 8), (True, False), None, "",
         "hf_babai/engine/experts.py (tests/test_moe.py reloads MoE checkpoints)", whole_groups=False, part="moe"),
    # GPTQModel reads GPTQ v1 through g_idx (partial last groups are fine) but refuses asymmetric v1 that it did not
    # write itself.
    Rule(GPTQMODEL, "TorchLinear and its GPU kernels", "gptq", (2, 3, 4, 8), (True,), None, "",
         "gptqmodel/models/loader.py (sym=False with FORMAT.GPTQ is refused)", whole_groups=False),
)
# fmt: on


@dataclass(frozen=True)
class Verdict:
    engine: str
    path: str
    loads: bool
    needs: str
    reason: str
    source: str


def servability(facts: CheckpointFacts, rules: tuple[Rule, ...] = RULES) -> list[Verdict]:
    """Per engine, the paths that load ``facts`` (default paths first) or, when none does, why each refuses. For a
    checkpoint with MoE experts an engine needs a dense path and an experts path; an engine with no experts rule
    here is reported as not checked for MoE (its dense verdict stands, marked so)."""
    out: list[Verdict] = []
    for engine in dict.fromkeys(r.engine for r in rules):
        dense = [r for r in rules if r.engine == engine and r.part == "linear"]
        moe = [r for r in rules if r.engine == engine and r.part == "moe" and r.kind == facts.kind]
        moe = moe if facts.experts else []
        ok = [r for r in dense if r.refusal(facts) is None]
        ok_moe = [r for r in moe if r.refusal(facts) is None]
        if ok and (ok_moe or not moe):
            out += [Verdict(engine, r.path, True, r.needs, "", r.source) for r in ok + ok_moe]
            if facts.experts and not moe:
                out.append(Verdict(engine, "MoE experts", True, "not checked for this engine", "", ""))
        else:
            refusing = (dense if not ok else []) + (moe if not ok_moe else [])
            out += [Verdict(engine, r.path, False, r.needs, r.refusal(facts) or "", r.source) for r in refusing]
    return out


def describe_checkpoint(qcfg: Mapping[str, Any], in_features: Mapping[str, int] | None = None) -> CheckpointFacts:
    """:class:`CheckpointFacts` from a ``quantization_config`` (compressed-tensors, GPTQ or babai).

    ``in_features`` (module name -> K), when given, decides whether every group is whole; without it groups are
    taken as whole for the exported formats (hf_babai writes them so) and as possibly partial for babai."""
    method = qcfg.get("quant_method")
    if method == "compressed-tensors":
        schemes = [g for g in qcfg.get("config_groups", {}).values() if isinstance(g, Mapping)]
        weights = [s.get("weights") or {} for s in schemes]
        if not weights or any(w.get("type", "int") != "int" for w in weights):
            raise ValueError("only weight-only int compressed-tensors checkpoints are described")
        bits = {int(w["num_bits"]) for w in weights}
        syms = {bool(w.get("symmetric", True)) for w in weights}
        if len(bits) != 1 or len(syms) != 1:
            raise ValueError(f"mixed bit widths or symmetry across config groups: {sorted(bits)}, {sorted(syms)}")
        sizes = frozenset(-1 if w.get("strategy") == "channel" else int(w["group_size"]) for w in weights)
        act = any(w.get("actorder") not in (None, False) for w in weights)
        return CheckpointFacts("compressed-tensors", bits.pop(), syms.pop(), sizes, True, act, _experts(in_features))
    if method == "gptq":
        g = int(qcfg["group_size"])
        whole = in_features is None or g == -1 or all(k % g == 0 for k in in_features.values())
        act = bool(qcfg.get("desc_act")) and g != -1
        return CheckpointFacts(
            "gptq", int(qcfg["bits"]), bool(qcfg["sym"]), frozenset({g}), whole, act, _experts(in_features)
        )
    if method == "babai":
        g = int(qcfg.get("group_size", 128))
        whole = in_features is not None and (g == -1 or all(k % g == 0 for k in in_features.values()))
        bits, sym = int(qcfg.get("bits", 4)), bool(qcfg.get("sym", True))
        return CheckpointFacts("babai", bits, sym, frozenset({g}), whole, False, _experts(in_features))
    raise ValueError(f"quant_method={method!r} is not a checkpoint hf_babai describes")


def _experts(in_features: Mapping[str, int] | None) -> bool:
    return in_features is not None and any(".experts." in name for name in in_features)


def format_report(verdicts: list[Verdict]) -> list[str]:
    """One line per engine: the paths that load it (and what they need), else the reasons each path refuses."""
    lines = []
    for engine in dict.fromkeys(v.engine for v in verdicts):
        mine = [v for v in verdicts if v.engine == engine]
        if mine[0].loads:
            paths = ", ".join(v.path + (f" ({v.needs})" if v.needs else "") for v in mine)
            lines.append(f"{engine}: loads it: {paths}")
        elif all(v.reason.startswith("reads ") for v in mine):
            kinds = list(dict.fromkeys(v.reason.removeprefix("reads ").split()[0] for v in mine))
            how = "hf-babai export" + (" --format gptq" if kinds == ["gptq"] else "")
            lines.append(f"{engine}: refuses it (reads {', '.join(kinds)} checkpoints: `{how}` writes them)")
        else:
            why = "; ".join(f"{v.path}: {v.reason}" for v in mine if not v.reason.startswith("reads "))
            lines.append(f"{engine}: refuses it ({why})")
    return lines


def default_path_serves(verdicts: list[Verdict], engine_prefix: str) -> bool:
    """Whether ``engine`` loads the checkpoint without extra flags (a GPU requirement is not a flag)."""
    return any(v.loads and v.engine.startswith(engine_prefix) and not v.needs.startswith("--") for v in verdicts)
