"""Memory of quantize-on-load with most decoder blocks offloaded to disk, against the same run in memory.

Each run is its own process (so its peak RSS is its own): ``from_pretrained(..., quantization_config=BabaiConfig)``
in fp32, in memory and with ``device_map="auto"``, ``max_memory={"cpu": MAX}`` and an ``offload_folder``. One JSON
record compares them: peak RSS (includes mmapped checkpoint pages, so it depends on the page cache), peak private
(anonymous) memory above the process baseline, the most float Linear weight materialized in the decoder blocks
at once (sampled as each block is onloaded: the property offloading is for), the fp32 checkpoint size, the blocks
on disk, and whether the two quantized models give identical logits. Private memory is also read at two points,
after loading (when quantization starts) and after quantization (before ``save_pretrained`` and the logits forward),
so a peak can be put down to its phase. ``integration_tests/test_hf_real.py`` runs
the same child on SmolLM2-135M and asserts the float-weight count and the identical logits.

    .venv/bin/python bench/offload_memory.py --model qwen2.5-0.5b --max-memory 800MiB

``--stream`` adds a third run: offloaded, writing each finished block to a run folder as it goes
(``BabaiConfig(run_dir=...)``, what ``hf-babai quantize`` does) and saving with ``hf_babai.save_streamed`` (the
block tensors copied from those files) instead of ``save_pretrained`` from memory. Every run records the peak of
private memory during the save alone (``peak_anon_save_mb``) and just before it (``anon_before_save_mb``): the
save's own cost, against the quantized model it starts from; the streamed checkpoint must equal the others.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def anon_mb() -> float:
    """Private (anonymous) resident memory of this process; mmapped checkpoint pages are page cache, not counted."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (this measurement needs Linux)")


def child(
    src: str, out: str, ids_file: str, offload: str, max_memory: str, bits: int, group_size: int, scale_method: str,
    stream: bool = False,
) -> dict:  # fmt: skip
    """Quantize on load (offloaded unless ``offload == "-"``), save to ``out`` with logits, return the memory record.
    ``scale_method="default"`` keeps the library's; tests pass ``"minmax"`` (memory does not depend on it).
    ``stream``: also write each finished block to a run folder as the run goes (``BabaiConfig(run_dir=...)``)."""
    import resource
    import threading

    import torch
    from transformers import AutoModelForCausalLM

    import hf_babai
    import hf_babai.engine as engine
    from hf_babai.formats import BabaiLinear

    peak = {"anon": 0.0, "float": 0.0}
    trace: list[float] = []

    phase = {"now": "loading", "at_peak": "loading"}  # what the process was doing when private memory peaked
    by_phase: dict[str, float] = {}  # the peak of each phase ("save": save_pretrained or save_streamed alone)

    def sample() -> None:
        while True:
            now = anon_mb()
            if now > peak["anon"]:
                peak["anon"], phase["at_peak"] = now, phase["now"]
            by_phase[phase["now"]] = max(by_phase.get(phase["now"], 0.0), now)
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    base = anon_mb()
    model_ref: list = [None]

    def float_block_mb(model) -> float:
        _, blocks = engine.find_blocks(model)
        lin = [m for m in blocks.modules() if isinstance(m, torch.nn.Linear) and not isinstance(m, BabaiLinear)]
        return sum(m.weight.numel() * m.weight.element_size() for m in lin if m.weight.device.type != "meta") / 2**20

    onload, find = engine.onload_block, engine.find_blocks

    def onload_and_measure(block) -> None:  # right after each onload: the most float weight held at once
        trace.append(round(anon_mb(), 1))  # private memory as each block starts: growth per block shows here
        phase["now"] = f"block {len(trace) - 1}"
        onload(block)
        peak["float"] = max(peak["float"], float_block_mb(model_ref[0]))

    def find_and_remember(model):  # quantize_model looks up its model's blocks first
        if model_ref[0] is None:  # loading is over: how much of the peak did it alone reach?
            peak["anon_loading"] = max(peak["anon"], anon_mb())
            phase["now"] = "calibration inputs"
        model_ref[0] = model
        return find(model)

    engine.onload_block, engine.find_blocks = onload_and_measure, find_and_remember
    ids = torch.load(ids_file)
    scales = {} if scale_method == "default" else {"scale_method": scale_method}
    run = {"run_dir": f"{out}.run"} if stream else {}
    cfg = hf_babai.BabaiConfig(bits=bits, group_size=group_size, dataset=ids, **scales, **run)
    kw = {"device_map": "auto", "max_memory": {"cpu": max_memory}, "offload_folder": offload} if offload != "-" else {}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float32, **kw)
    seconds = time.perf_counter() - t0
    peak_load_quantize = max(peak["anon"], anon_mb())  # before the save and the logits forward
    disk = sorted(k for k, v in (getattr(model, "hf_device_map", None) or {}).items() if v == "disk")
    time.sleep(0.05)
    before_save = anon_mb()
    phase["now"] = "save"
    if stream:
        hf_babai.save_streamed(model, out)
    else:
        model.save_pretrained(out)
    time.sleep(0.05)  # the sampler's last reading of the save
    phase["now"] = "logits"
    with torch.no_grad():
        torch.save(model(ids[:2, :128]).logits, Path(out) / "logits.pt")
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "base_anon_mb": base, "peak_anon_mb": peak["anon"], "peak_anon_loading_mb": peak.get("anon_loading"),
        "peak_anon_until_quantized_mb": peak_load_quantize, "anon_at_onload_mb": trace,
        "anon_before_save_mb": before_save, "peak_anon_save_mb": by_phase.get("save"),
        "phase_at_peak_anon": phase["at_peak"], "disk": disk, "float_peak_mb": peak["float"], "seconds": seconds,
    }  # fmt: skip


def run_child(
    src: Path, out: Path, ids_file: Path, offload: str, max_memory: str, bits: int, group: int, scales: str = "default",
    stream: bool = False,
) -> dict:  # fmt: skip
    """:func:`child` in a fresh process; its record."""
    args = [sys.executable, __file__, "--one", str(src), str(out), str(ids_file), offload, max_memory]
    proc = subprocess.run([*args, str(bits), str(group), scales, str(int(stream))], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"quantize-on-load child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        src, out, ids_file, offload, max_memory, bits, group, scales, stream = sys.argv[2:11]
        print(json.dumps(child(src, out, ids_file, offload, max_memory, int(bits), int(group), scales, stream == "1")))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-memory", default="160MiB", help="accelerate's CPU budget; the rest goes to disk")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--only-offloaded", action="store_true", help="skip the in-memory run (no logits comparison)")
    ap.add_argument("--stream", action="store_true", help="also the offloaded run writing each block to a run folder")
    ap.add_argument("--out", type=Path, help="append the JSON record here too")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from hf_babai import assets
    from hf_babai.perplexity import calibration_windows

    src = assets.ensure_model(args.model)
    tok = AutoTokenizer.from_pretrained(src)
    ids = calibration_windows(tok, assets.calibration_text(), n=args.calib, seqlen=args.calib_seqlen)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        torch.save(ids, tmp / "ids.pt")
        runs = {}
        if not args.only_offloaded:
            runs["in_memory"] = run_child(src, tmp / "inmem", tmp / "ids.pt", "-", "-", args.bits, args.group_size)
        runs["offloaded"] = run_child(
            src, tmp / "offloaded", tmp / "ids.pt", str(tmp / "off"), args.max_memory, args.bits, args.group_size
        )
        if args.stream:
            runs["offloaded_streamed"] = run_child(
                src, tmp / "streamed", tmp / "ids.pt", str(tmp / "off2"), args.max_memory, args.bits, args.group_size,
                stream=True,
            )  # fmt: skip
        same = streamed_same = None
        if "in_memory" in runs:
            same = torch.equal(torch.load(tmp / "inmem" / "logits.pt"), torch.load(tmp / "offloaded" / "logits.pt"))
        if args.stream:  # the streamed checkpoint is the one save_pretrained wrote, byte for byte
            streamed_same = all(
                (tmp / "streamed" / f.name).read_bytes() == f.read_bytes() for f in (tmp / "offloaded").iterdir()
            )
    fp32_mb = sum(f.stat().st_size for f in Path(src).glob("*.safetensors")) / 2**20
    for r in runs.values():
        r["on_disk"] = r.pop("disk")  # device-map keys; [""] = the whole model
        r["private_above_base_mb"] = r["peak_anon_mb"] - r["base_anon_mb"]
        r["save_extra_mb"] = r["peak_anon_save_mb"] - r["anon_before_save_mb"]  # what the save itself added
    rec = {
        "model": args.model, "bits": args.bits, "group_size": args.group_size,
        "calib": f"{args.calib}x{args.calib_seqlen}", "max_memory": args.max_memory,
        "fp32_checkpoint_mb": fp32_mb, "logits_equal": same, "streamed_files_equal": streamed_same, **runs,
    }  # fmt: skip
    print(json.dumps(rec))
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
