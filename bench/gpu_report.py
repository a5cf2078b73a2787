"""Collects the parts of ``scripts/gpu_check.sh`` into one JSON file each and prints the summary.

Reads what each part left in the work folder (``<part>.status``: exit code and seconds; ``<part>.stdout`` /
``.stderr``; the part's own JSON, or for a part stopped early the JSON records it had printed) and writes
``tests.json``, ``kernels.json``, ``engine.json``, ``decode.json``, ``distributed.json`` and ``summary.json`` to the
output folder, each with the device name. The summary checks the kernel targets (M = 1 on the 4096×14336
weight: int4 g128 ≥ 3.5× BF16, int3 ≥ 4.5×, SSQR 3-bit ≥ 4×, HPTQ ≥ 1.5×; at M = 128 no format more than 10 %
slower than BF16) and says
whether the run qualifies the Triton kernels as the CUDA default (``TRITON_GPU_VERIFIED`` in
``hf_babai/formats/kernel_ops.py``): every kernel test passed and every kernel's result matched its reference.

    python bench/gpu_report.py WORK_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

PARTS = ("tests", "kernels", "engine", "decode", "distributed")
TARGET_SHAPE = (4096, 14336)  # (N out, K in): Llama-3-8B's down_proj
# format label in bench/kernel_speed.py's records → speedup over BF16 at M = 1 on TARGET_SHAPE
M1_TARGETS = {"int4": 3.5, "int3": 4.5, "ssqr": 4.0, "hptq": 1.5}
M128_MAX_SLOWDOWN = 1.10
KERNEL_TOLERANCE = 2e-2  # relative error of a BF16 kernel result against the float product of the same weight


def _device() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
    except Exception as exc:  # the report must still be written when torch itself is broken
        return f"unknown ({exc.__class__.__name__})"


def _status(work: Path, name: str) -> dict:
    path = work / f"{name}.status"
    if not path.is_file():
        return {"status": "not run", "rc": None, "seconds": None}
    rc, seconds = (int(v) for v in path.read_text().split())
    status = "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed"
    tail = (work / f"{name}.stderr").read_text(errors="replace").strip().splitlines()[-15:]
    return {"status": status, "rc": rc, "seconds": seconds, **({"stderr_tail": tail} if rc else {})}


def _records(work: Path, name: str) -> object:
    """The part's JSON file, or the JSON lines it printed before it stopped."""
    path = work / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    out = []
    stdout = work / f"{name}.stdout"
    for line in stdout.read_text(errors="replace").splitlines() if stdout.is_file() else []:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def tests_part(work: Path) -> dict:
    result = _status(work, "tests")
    xml = work / "tests.xml"
    if not xml.is_file():
        return {**result, "counts": None}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        name = f"{case.get('classname')}::{case.get('name')}"
        if "failure" in kinds or "error" in kinds:
            counts["failed" if "failure" in kinds else "errors"] += 1
            child = next(c for c in case if c.tag in ("failure", "error"))
            failures.append({"test": name, "message": (child.get("message") or "")[:500]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**result, "counts": counts, "failures": failures}


def kernel_targets(records: list[dict]) -> list[dict]:
    """The issue's speed targets, each with the measured value and whether it is met (None: not measured)."""
    checks = []
    at = {(r["format"], r["N"], r["K"], r["M"]): r for r in records if "M" in r}
    for fmt, target in M1_TARGETS.items():
        rec = at.get((fmt, *TARGET_SHAPE, 1))
        got = None if rec is None else rec["speedup"]
        checks.append({"target": f"{fmt} M=1 {TARGET_SHAPE[0]}x{TARGET_SHAPE[1]} speedup >= {target}",
                       "measured": got, "met": None if got is None else got >= target})  # fmt: skip
    big = [r for r in records if r.get("M") == 128]
    worst = min(big, key=lambda r: r["speedup"], default=None)
    checks.append({
        "target": f"every format at M=128 no more than {round(100 * (M128_MAX_SLOWDOWN - 1))} % slower than BF16",
        "measured": None if worst is None else f"{worst['format']} {worst['N']}x{worst['K']}: {worst['speedup']}",
        "met": None if worst is None else worst["speedup"] >= 1 / M128_MAX_SLOWDOWN,
    })  # fmt: skip
    return checks


def main(work: Path, dest: Path) -> dict:
    device = _device()
    dest.mkdir(parents=True, exist_ok=True)
    parts = {"tests": tests_part(work)}
    for name in PARTS[1:]:
        parts[name] = {**_status(work, name), "records": _records(work, name)}
    kernels = [r for r in parts["kernels"]["records"] if isinstance(r, dict) and "max_rel_err" in r]
    bad = [f"{r['format']} {r['N']}x{r['K']} M={r['M']}: {r['max_rel_err']:.3g}" for r in kernels
           if not r["max_rel_err"] <= KERNEL_TOLERANCE]  # fmt: skip
    bad += [f"{r['format']} {r['N']}x{r['K']}: {r['error']}" for r in parts["kernels"]["records"] if "error" in r]
    parts["kernels"].update(copy_gbps=kernels[0]["copy_gbps"] if kernels else None, targets=kernel_targets(kernels),
                            wrong_results=bad)  # fmt: skip
    for name, body in parts.items():
        (dest / f"{name}.json").write_text(json.dumps({"part": name, "device": device, **body}, indent=1))
    counts = parts["tests"].get("counts") or {}
    qualifies = (
        not device.startswith(("cpu", "unknown"))  # a dry run on CPU checks the script, not the kernels
        and parts["tests"]["status"] == "ok"
        and counts.get("passed", 0) > 0
        and not counts.get("failed")
        and not counts.get("errors")
        and parts["kernels"]["status"] == "ok"
        and bool(kernels)
        and not bad
    )
    engine = parts["engine"]["records"] if isinstance(parts["engine"]["records"], dict) else {}
    distributed = parts["distributed"]["records"] if isinstance(parts["distributed"]["records"], dict) else {}
    summary = {
        "device": device,
        "parts": {name: {k: body.get(k) for k in ("status", "rc", "seconds")} for name, body in parts.items()},
        "tests": counts,
        "kernel_targets": parts["kernels"]["targets"],
        "kernel_wrong_results": bad,  # results off their reference, and formats that failed
        "engine_passed": engine.get("passed"),
        "distributed_identical": distributed.get("identical"),  # one NCCL rank gives the single-process model
        "decode": [
            {k: r.get(k) for k in ("format", "bits", "backend", "tokens_per_s", "speedup", "linear_speedup", "error")}
            for r in parts["decode"]["records"]
            if isinstance(r, dict)
        ],
        "triton_kernels_qualify_as_cuda_default": qualifies,
    }
    (dest / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"gpu_check on {device}")
    for name, body in summary["parts"].items():
        print(f"  {name:<8} {body['status']:<8} {body['seconds']} s")
    print(f"  tests: {counts}")
    for check in summary["kernel_targets"]:
        print(f"  target {check['target']}: {check['measured']} -> {check['met']}")
    print(f"  engine same as the CPU run: {summary['engine_passed']}")
    print(f"  distributed ({distributed.get('backend')}, one rank) same as one process: {distributed.get('identical')}")
    for rec in summary["decode"]:
        label = f"{rec['format']}{rec['bits']}" if rec["format"] == "int" else rec["format"]
        result = rec["error"] or f"{rec['tokens_per_s']} tok/s (x{rec['speedup']}; Linears x{rec['linear_speedup']})"
        print(f"  decode {label:<6} {rec['backend']:<6}: {result}")
    print(f"  Triton kernels qualify as the CUDA default: {qualifies}")
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[-1].strip())
    main(Path(sys.argv[1]), Path(sys.argv[2]))
