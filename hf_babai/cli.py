"""Command line ``hf-babai``: ``demo`` (the README's job), ``quantize``, ``export``, ``info``, ``publish``, ``eval``.

Exit codes: 0 success, 1 bad input or a failed run (the message says what and how to fix it), 2 usage errors.
The quantization options are generated from :mod:`hf_babai.spec` (names, types, choices, help), so the command
line always offers exactly what ``BabaiConfig`` accepts.

``demo`` installs the small offline model and the evaluation text if needed (the one command that downloads),
measures the full-precision perplexity on held-out text, quantizes a fresh copy of the model at each requested
bit width with the default settings and prints perplexity, true bits per weight and the time taken.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from .spec import defaults, setting_kind, settings

DEFAULTS = {"model": "smollm2-135m", "calib": 32, "calib_seqlen": 512, "seqlen": 2048, "windows": 4}
EVAL_FIELDS = ("task_type", "dataset_type", "dataset_name", "metric_type", "metric_value", "source_name", "source_url")


def _demo(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import assets
    from .data import calibration_text
    from .engine import QuantSpec, model_bits_per_weight, quantize_model
    from .perplexity import calibration_windows, eval_windows, perplexity

    torch.manual_seed(0)
    _threads(args.threads)
    if args.quick:  # the one-minute try: one bit width, a small calibration set and a short evaluation
        args.bits, args.calib, args.calib_seqlen, args.seqlen, args.windows = [4], 8, 256, 512, 4
    extra = {"scale_method": "minmax"} if args.quick else {}
    path = assets.ensure_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    evalw = eval_windows(tok, assets.eval_text(), args.seqlen, args.windows)
    calib = calibration_windows(tok, calibration_text(), args.calib, args.calib_seqlen)

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    t0 = time.perf_counter()
    fp = perplexity(load(), evalw)
    print(f"{args.model}: full precision  ppl {fp:8.3f}   ({evalw.numel()} tokens, {time.perf_counter() - t0:.0f}s)")
    results = [{"bits": 16, "ppl": fp}]
    for bits in args.bits:
        model = load()
        spec = QuantSpec(bits=bits, group_size=args.group_size, order=args.order, method=args.method, **extra)
        t0 = time.perf_counter()
        quantize_model(model, spec, calib, progress=not args.quiet)
        secs = time.perf_counter() - t0
        bpw = model_bits_per_weight(model)
        ppl = perplexity(model, evalw)
        print(
            f"{args.model}: {args.method} {bits}-bit g{args.group_size} {args.order}: ppl {ppl:8.3f} "
            f"(full precision {fp:.3f})  {bpw:.3f} bits/weight  quantized in {secs:.0f}s"
        )
        results.append({"bits": bits, "ppl": ppl, "bpw": bpw, "seconds": secs})
    if args.json:
        print(json.dumps(results))
    return 0


class CliError(Exception):
    """A problem with the user's input; printed as ``error: ...`` with exit code 1."""


def _read_jsonl(path: Path) -> list[str] | list[dict]:
    """One JSON object a line: all with a string ``text`` or all with ``input_ids`` (a list of token ids)."""
    rows: list = []
    kind = None
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
        this = "text" if isinstance(row, dict) and isinstance(row.get("text"), str) else None
        if isinstance(row, dict) and isinstance(row.get("input_ids"), list):
            this = "input_ids"
        if this is None or (kind is not None and this != kind):
            raise CliError(
                f"{path}:{i}: each line must be a JSON object with a string 'text' field, or each with an "
                "'input_ids' list of token ids (not a mix)"
            )
        kind = this
        rows.append(row["text"] if kind == "text" else {k: row[k] for k in ("input_ids", "attention_mask") if k in row})
    if not rows:
        raise CliError(f"{path} has no calibration rows")
    return rows


def _read_token_file(path: Path) -> object:
    """A ``.pt`` file of token ids: an integer tensor ``[n, T]`` or a list of ``{"input_ids": ...}`` rows."""
    import torch

    try:
        data = torch.load(path, weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a tensor archive
        raise CliError(f"{path} cannot be read with torch.load ({type(e).__name__}: {e})") from None
    if isinstance(data, torch.Tensor) or (isinstance(data, list) and data and isinstance(data[0], dict)):
        return data
    raise CliError(f"{path} holds {type(data).__name__}; save an integer tensor [n, T] or a list of input_ids dicts")


def _read_datasets(name: str, config: str | None, split: str, column: str) -> list[str] | list[dict]:
    """A column of a ``datasets`` dataset (a Hub name or a local folder of data files): text or token ids."""
    from hf_babai.hf.calibration import dataset_rows

    try:
        import datasets
    except ImportError:
        raise CliError("--dataset datasets:NAME needs the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types (missing split, config, connection)
        raise CliError(f"cannot load dataset {name!r} (config {config!r}, split {split!r}): {e}") from None
    if column not in ds.column_names:
        raise CliError(f"dataset {name!r} has no column {column!r}; its columns: {ds.column_names} (--dataset-column)")
    return dataset_rows(ds, column)


def _read_dataset(args: argparse.Namespace) -> object:
    """``--dataset``: ``austen`` (built-in), a ``.txt`` file (one document), a ``.jsonl`` file (``text`` or
    ``input_ids`` per line), a ``.pt`` file of token ids, or ``datasets:NAME`` (with ``--dataset-config``,
    ``--dataset-split``, ``--dataset-column``)."""
    source = args.dataset
    if source == "austen":
        return "austen"
    if source.startswith("datasets:"):
        return _read_datasets(source[len("datasets:") :], args.dataset_config, args.dataset_split, args.dataset_column)
    path = Path(source)
    if not path.is_file():
        raise CliError(
            f"--dataset {source!r} is neither 'austen', 'datasets:NAME', nor an existing .txt/.jsonl/.pt file"
        )
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".pt":
        return _read_token_file(path)
    return [path.read_text(encoding="utf-8")]


def _max_memory(items: list[str] | None) -> dict | None:
    """``cpu=2GiB 0=20GiB`` → accelerate's ``max_memory``; a clear error for anything else."""
    if not items:
        return None
    out: dict = {}
    for kv in items:
        key, sep, value = kv.partition("=")
        if not sep or not key or not value:
            raise CliError(f"--max-memory takes DEVICE=SIZE pairs like cpu=2GiB 0=20GiB, got {kv!r}")
        out[int(key) if key.isdigit() else key] = value
    return out


def _check_model(src: str) -> None:
    """A model argument that is clearly a local path (absolute, ``./``, ``~``, more than one ``/``) must exist,
    so it is not reported as a bad Hub repo id."""
    looks_local = src.startswith((".", "/", "~")) or src.count("/") > 1 or "\\" in src
    if looks_local and not Path(src).expanduser().exists():
        raise CliError(f"model folder {src} does not exist; give an existing folder or a Hub id like org/name")


def _threads(n: int | None) -> None:
    if n is not None:
        import torch

        if n < 1:
            raise CliError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def _launch(argv: list[str], nproc: int) -> int:
    """``hf-babai quantize --nproc N``: this process becomes ``torchrun`` running the same command on N local
    processes (the option itself dropped), which then share the calibration and the solves (docs/distributed.md)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [*cmd, "-m", "hf_babai", *rest])  # torchrun takes this process's place (and its exit code)
    return 1  # not reached


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """An unfinished run of the same ``--out`` is continued only with ``--resume`` and discarded only with
    ``--overwrite``; it is never silently reused or lost."""
    from hf_babai.engine.resume import RUN_FILE

    held = (run_dir / RUN_FILE).is_file()
    if held and not resume and not any((run_dir / "blocks").glob("block-*.json")):
        shutil.rmtree(run_dir)  # stopped before its first block was finished: nothing to keep
        held = False
    if resume and not held:
        raise CliError(f"--resume: there is no unfinished run to continue ({run_dir} holds none)")
    if held and not resume:
        if not overwrite:
            raise CliError(
                f"an unfinished run of this --out is kept in {run_dir}: continue it with --resume, or start again "
                "with --overwrite (which discards it)"
            )
        shutil.rmtree(run_dir)


def _resume_hint(args: argparse.Namespace) -> str:
    """After a failed or interrupted quantize: how many blocks are kept and how to continue."""
    run_dir = getattr(args, "run_dir", None)
    if run_dir is None or not run_dir.is_dir():
        return ""
    done = len(list((run_dir / "blocks").glob("block-*.json")))
    if not done:
        shutil.rmtree(run_dir, ignore_errors=True)
        return ""
    return f"; {done} finished blocks are kept in {run_dir}: run the same command with --resume to continue"


def _join_process_group() -> int | None:
    """Under ``torchrun`` (``WORLD_SIZE`` set): joins the process group (NCCL on GPUs, each rank on its own, else
    gloo) and returns this rank's local index; ``None`` in a plain single-process run."""
    if "WORLD_SIZE" not in os.environ:
        return None
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return local


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _dir_bytes(path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern))


def _quantize(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import hf_babai
    from hf_babai.engine import LAYER_TABLE_HEADER, TOWER_BLOCK, weight_report
    from hf_babai.formats import get_format
    from hf_babai.hf.files import check_destination, staged_folder
    from hf_babai.hf.streamed import DEFAULT_SHARD, parse_size

    src = args.model
    _check_model(src)
    _threads(args.threads)
    sources = {"the model": src} if Path(src).exists() else {}
    out = check_destination(args.out, overwrite=args.overwrite, sources=sources)
    exports = [(f, t) for f, t in ((args.export, "compressed-tensors"), (args.export_gptq, "gptq")) if f]
    for i, (folder, _) in enumerate(exports):
        others = {"--out": out, **sources, **{f"the {t} export": f for f, t in exports[:i]}}
        check_destination(folder, overwrite=args.overwrite, sources=others)
    memory = _max_memory(args.max_memory)
    shard = DEFAULT_SHARD if args.max_shard_size is None else args.max_shard_size
    try:
        parse_size(shard)
    except ValueError as e:
        raise CliError(str(e).replace("max_shard_size=", "--max-shard-size ")) from None
    if args.nproc is not None and args.nproc < 1:
        raise CliError(f"--nproc must be >= 1, got {args.nproc}")
    launch = args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ
    main_rank = os.environ.get("RANK", "0") == "0"  # the one that checks, prints and writes
    run_dir = args.run_dir = out.parent / f".{out.name}.unfinished"  # finished blocks, kept until --out is written
    if main_rank:
        _check_run_dir(run_dir, args.resume, args.overwrite)
    if launch:
        return _launch(args.argv, args.nproc)
    local_rank = _join_process_group()
    try:
        cfg_src = AutoConfig.from_pretrained(src)
    except OSError as e:
        raise CliError(f"cannot load the model {src}: {str(e).splitlines()[0]}") from None
    if getattr(cfg_src, "quantization_config", None) is not None:
        qm = cfg_src.quantization_config
        qm = qm.get("quant_method") if isinstance(qm, dict) else getattr(qm, "quant_method", qm)
        raise CliError(f"{src} is already quantized (quant_method={qm!r}); start from the full-precision model")
    tok = AutoTokenizer.from_pretrained(src)
    fields = _settings_from(args)
    dataset = _read_dataset(args) if fields.get("method", "babai") == "babai" else None
    qcfg = hf_babai.BabaiConfig(dataset=dataset, tokenizer=tok, run_dir=run_dir, resume=args.resume, **fields)

    class _TqdmHandler(logging.Handler):  # live per-layer table that does not break the progress bar
        def emit(self, record: logging.LogRecord) -> None:
            tqdm.write(self.format(record))

    engine_log = logging.getLogger("hf_babai.engine")
    if not args.quiet and main_rank:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        engine_log.addHandler(handler)
        engine_log.setLevel(logging.INFO)
        engine_log.propagate = False
        print(LAYER_TABLE_HEADER)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    load_kw: dict = {"dtype": dtype}
    if args.device_map:
        load_kw["device_map"] = args.device_map
    elif local_rank is not None and torch.cuda.is_available():
        load_kw["device_map"] = {"": local_rank}
    if args.offload_folder:
        load_kw["offload_folder"] = args.offload_folder
    if memory:
        load_kw["max_memory"] = memory
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=qcfg, **load_kw)
    secs = time.perf_counter() - t0
    if not main_rank:  # every rank holds the same quantized model; rank 0 writes it
        return 0
    with staged_folder(out) as tmp:  # nothing at --out until every file is written
        hf_babai.save_streamed(model, tmp, max_shard_size=shard)  # the quantized blocks are copied from run_dir
        tok.save_pretrained(tmp)
        hf_babai.write_quant_log(model, tmp / "quant_log.csv")
    try:
        for folder, target in exports:
            with staged_folder(folder) as tmp:
                hf_babai.export(model, tmp, target)
                tok.save_pretrained(tmp)
    finally:  # --out holds the finished checkpoint; the exports read the mapped block files until here
        shutil.rmtree(run_dir, ignore_errors=True)
    records = hf_babai.hf.quant_log_records(model)
    solved = [r for r in records if r.block != TOWER_BLOCK]  # a vision tower's are rounded: no loss to add up
    loss = sum(float(r.stats["loss"]) for r in solved)
    bound = sum(float(r.stats["bound"]) for r in solved)
    src_bytes = _dir_bytes(src) if Path(src).is_dir() else float("nan")
    spec = qcfg.spec()
    weights = weight_report(model, spec.skip)
    summary = {
        "model": str(src),
        "out": str(out),
        "layers": len(records),
        "format": spec.format,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "bits_per_weight": weights["bits_per_weight"],
        "bits_per_weight_all": weights["bits_per_weight_all"],
        "float_share": weights["float_share"],
        "seconds": round(secs, 1),
        "peak_rss_gib": round(_peak_rss_gib(), 2),
        "size_before_mib": round(src_bytes / 2**20, 1),
        "size_after_mib": round(_dir_bytes(out) / 2**20, 1),
        "loss": loss,
        "bound": bound,
    }
    what = get_format(spec.format).describe(spec)["format"]
    print(
        f"quantized {summary['layers']} layers of {src} to {what} in {secs:.0f}s: "
        f"{summary['bits_per_weight']:.3f} bits/weight in the quantized layers, "
        f"{summary['bits_per_weight_all']:.3f} over all weights (float: {_shares(summary['float_share'])}), "
        f"peak RSS {summary['peak_rss_gib']:.2f} GiB, "
        f"checkpoint {summary['size_before_mib']:.0f} MiB -> {summary['size_after_mib']:.0f} MiB; "
        f"saved to {out} (quant_log.csv has the per-layer table)"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def _shares(share: dict[str, float]) -> str:
    """``embedding 12.1%, norm 0.3%``: what stays float, as shares of all weights."""
    return ", ".join(f"{kind} {100 * v:.1f}%" for kind, v in share.items()) or "none"


def _export(args: argparse.Namespace) -> int:
    import warnings

    import torch

    import hf_babai
    from hf_babai.hf.export import export_report
    from hf_babai.hf.files import check_destination, staged_folder
    from hf_babai.hf.summary import read_babai_config

    read_babai_config(args.source)  # a clear error for a folder that is not a babai checkpoint, before any work
    out = check_destination(args.out, overwrite=args.overwrite, sources={"the source checkpoint": args.source})
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    with warnings.catch_warnings(record=True) as caught, staged_folder(out) as tmp:
        warnings.simplefilter("always")
        hf_babai.export(args.source, tmp, args.format, dtype=dtype)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"exported {args.source} to {out} ({args.format})")
    for line in export_report(out):
        print(f"  {line}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from hf_babai.engine.resume import RUN_FILE, run_progress, unfinished_message
    from hf_babai.hf.summary import checkpoint_summary, exported_summary, read_config

    path = Path(args.checkpoint)
    if (path / RUN_FILE).is_file():
        raise CliError(unfinished_message(path, *run_progress(path)))
    method = (read_config(path).get("quantization_config") or {}).get("quant_method")
    if method in ("compressed-tensors", "gptq"):
        info = exported_summary(path)
        info["size_mib"] = round(info.pop("size_bytes") / 2**20, 1)
        serving = info.pop("serving")
        if args.json:
            print(json.dumps({**info, "serving": serving}, indent=2))
        else:
            for k, v in info.items():
                print(f"{k:>19}: {v}")
            for i, line in enumerate(serving):
                print(f"{'serving' if i == 0 else '':>19}: {line}")
        return 0
    summary = checkpoint_summary(path)
    info = {k: summary[k] for k in ("checkpoint", "architecture", "format", "method", "order", "quantized_layers")}
    info["bits_per_weight"] = summary["bits_per_weight"]
    info["bits_per_weight_all"] = summary["bits_per_weight_all"]
    info["float"] = _shares(summary["float_share"])
    info["size_mib"] = round(summary["size_bytes"] / 2**20, 1)
    info["calibration"] = summary["calibration"]
    info["checked"] = "every packed tensor present with the right shape and dtype"
    if summary["layer_stats"] is not None:
        info["layer_stats"] = summary["layer_stats"]
    if args.json:
        print(json.dumps({**info, "serving": summary["serving"]}, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>19}: {v}")
        print(f"{'load with':>19}: import hf_babai; AutoModelForCausalLM.from_pretrained({str(path)!r})")
        for i, line in enumerate(summary["serving"]):
            print(f"{'serving' if i == 0 else '':>19}: {line}")
    return 0


def _eval_file(path: Path) -> Path:
    return path / "eval_results.json"


def _read_eval_file(file: Path) -> dict:
    """An ``eval_results.json`` written by ``hf-babai eval --save``; a clear error for anything else."""
    try:
        saved = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        saved, why = None, e
    else:
        why = "no 'eval_results' field"
    if not isinstance(saved, dict) or "eval_results" not in saved:
        raise CliError(f"{file} is not an eval_results.json written by `hf-babai eval --save` ({why})")
    return saved


def _saved_evals(checkpoint: Path, given: str | None) -> list[dict] | None:
    """Evaluation results for the card: ``--eval-results FILE``, else the checkpoint's ``eval_results.json``
    (from ``hf-babai eval --save``), used only when it records these very weights (their SHA-256)."""
    from hf_babai.hf.summary import weights_sha256

    file = Path(given) if given else _eval_file(checkpoint)
    if not file.is_file():
        if given:
            raise CliError(f"--eval-results {file} does not exist")
        return None
    saved = _read_eval_file(file)
    recorded = saved.get("checkpoint_sha256")
    if recorded != weights_sha256(checkpoint):
        why = "records no checkpoint hash" if recorded is None else "was measured on other weights"
        raise CliError(
            f"{file} {why}, so its figures may not describe {checkpoint}; run `hf-babai eval {checkpoint} --save` "
            "again, or delete the file to publish without evaluation results"
        )
    return saved["eval_results"]


def _publish(args: argparse.Namespace) -> int:
    import hf_babai

    path = Path(args.checkpoint)
    evals = _saved_evals(path, args.eval_results)
    baseline = None  # the original model's figures (`hf-babai eval ORIGINAL --save`): no hash to match
    if args.baseline_eval_results:
        baseline = _read_eval_file(Path(args.baseline_eval_results))["eval_results"]
    try:
        result = hf_babai.publish(
            path,
            args.repo_id,
            private=args.private or None,
            base_model=args.base_model,
            eval_results=evals,
            card_template=args.card_template,
            commit_message=args.message,
            revision=args.revision,
            license=args.license,
            timeout=args.timeout,
            dry_run=args.dry_run,
            install=args.install,
            baseline_results=baseline,
        )
    except hf_babai.PublishError as e:  # token problems, Hub refusals and outages: a message, not a traceback
        raise CliError(str(e)) from None
    if args.dry_run:
        print("\n".join(result.lines()))
        print("--- README.md (model card) ---")
        print(result.card)
        print("dry run: nothing was uploaded")
        return 0
    print(f"published: {result}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_babai
    from hf_babai.hf.summary import read_config

    path = Path(args.checkpoint)
    read_config(path)  # a clear error for a folder that is not a model (a babai checkpoint or the original)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit  # <1: a fraction
    res = hf_babai.evaluate(model, tok, args.tasks, limit=limit, text_file=args.text_file)
    print(res.table())
    if args.save:
        from hf_babai.hf.summary import weights_sha256

        rows = [{k: getattr(e, k) for k in EVAL_FIELDS} for e in res.eval_results]
        saved = {"checkpoint_sha256": weights_sha256(path), "results": res.results, "eval_results": rows}
        _eval_file(path).write_text(json.dumps(saved, indent=2))
        print(f"saved to {_eval_file(path)} (`hf-babai publish` puts it into the model card)")
    return 0


def add_setting(parser: argparse.ArgumentParser, name: str, **overrides) -> None:
    """The option of one :class:`hf_babai.spec.QuantSpec` field: flag, type, choices and help from the spec; unset
    (``None``) means the spec's default."""
    s = settings()[name]
    kind = setting_kind(name)
    kw: dict = {"dest": name, "default": None, "help": s.help}
    if kind == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    elif kind == "list":
        kw["nargs"] = "*"
    else:
        kw["type"] = {"int": int, "float": float, "str": str}[kind]
        if s.options() is not None:
            kw["choices"] = s.options()
    kw.update(overrides)
    if kw["default"] is not None:
        kw["help"] += " (default: %(default)s)"
    elif defaults()[name] is not None:
        kw["help"] += f" (default: {defaults()[name]:g})" if kind == "float" else f" (default: {defaults()[name]})"
    parser.add_argument(s.cli or "--" + name.replace("_", "-"), **kw)


def _settings_from(args: argparse.Namespace) -> dict:
    """The settings given on the command line (the rest keep their defaults)."""
    out = {name: getattr(args, name) for name in settings() if getattr(args, name) is not None}
    if out.get("modules_to_not_convert") == []:
        del out["modules_to_not_convert"]
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-babai`` parser: its quantization options come from the settings spec, so help cannot go stale."""
    parser = argparse.ArgumentParser(prog="hf-babai", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize the small offline model and print perplexity before/after")
    demo.add_argument("--model", default=DEFAULTS["model"], help="offline model name (see hf_babai.assets.MODELS)")
    add_setting(demo, "bits", nargs="+", default=[3, 4])
    add_setting(demo, "group_size", default=128)
    add_setting(demo, "order", default="act-order")
    add_setting(demo, "method", default="babai")
    demo.add_argument("--calib", type=int, default=DEFAULTS["calib"], help="calibration windows")
    demo.add_argument("--calib-seqlen", type=int, default=DEFAULTS["calib_seqlen"])
    demo.add_argument("--seqlen", type=int, default=DEFAULTS["seqlen"], help="evaluation window length")
    demo.add_argument("--windows", type=int, default=DEFAULTS["windows"], help="evaluation windows")
    demo.add_argument("--json", action="store_true", help="also print the results as JSON")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a first try in a minute or two on a laptop CPU: 4-bit only, 8 x 256 calibration tokens, min-max "
        "scales, a short evaluation",
    )
    demo.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice)")

    q = sub.add_parser("quantize", help="quantize a model folder (or Hub id) and save a babai checkpoint")
    q.add_argument("model", help="full-precision model folder or Hub id")
    q.add_argument("--out", required=True, help="output folder for the quantized checkpoint")
    for name in settings():
        add_setting(q, name)
    q.add_argument(
        "--dataset",
        default="austen",
        help="calibration data: 'austen' (built-in), a .txt file, a .jsonl file (a 'text' or an 'input_ids' field "
        "per line), a .pt file of token ids [n, T], or datasets:NAME (a Hub dataset or a local data folder)",
    )
    q.add_argument("--dataset-config", default=None, help="config name of a datasets:NAME dataset")
    q.add_argument("--dataset-split", default="train", help="split of a datasets:NAME dataset (default: train)")
    q.add_argument("--dataset-column", default="text", help="column of a datasets:NAME dataset: text or token ids")
    q.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice)")
    q.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes sharing the work (torchrun on this machine; GPUs: one each): same result as one process "
        "with --no-true-sequential",
    )
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    q.add_argument("--device-map", default=None, help="e.g. auto (accelerate; blocks may be offloaded to disk)")
    q.add_argument("--offload-folder", default=None, help="folder for disk-offloaded weights")
    q.add_argument("--max-memory", nargs="*", default=None, help="e.g. cpu=2GiB 0=20GiB")
    q.add_argument(
        "--max-shard-size",
        default=None,
        help="largest checkpoint file, e.g. 5GB (default: transformers' 50GB); the quantized blocks are copied "
        "into the shards from the run folder, so the size does not change the memory the save needs",
    )
    q.add_argument("--export", default=None, help="also write a compressed-tensors checkpoint (vLLM) to this folder")
    q.add_argument("--export-gptq", default=None, help="also write a GPTQ v1 checkpoint to this folder")
    q.add_argument(
        "--overwrite", action="store_true", help="allow a non-empty --out folder (and discard an unfinished run)"
    )
    q.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run of this --out from its last finished block (same model, data, settings)",
    )
    q.add_argument("--json", action="store_true", help="also print the summary as JSON")
    q.add_argument("--quiet", action="store_true", help="no per-layer table")

    ex = sub.add_parser("export", help="write a babai checkpoint as compressed-tensors (vLLM, SGLang) or GPTQ v1")
    ex.add_argument("source", help="babai checkpoint folder")
    ex.add_argument("out", help="output folder (new or empty)")
    ex.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "gptq"])
    ex.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16"],
        help="dtype the export is served in (auto: the checkpoint's; give the original model's if it was float32)",
    )
    ex.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder")

    i = sub.add_parser("info", help="describe and check a checkpoint (babai or exported) without loading weights")
    i.add_argument("checkpoint", help="checkpoint folder")
    i.add_argument("--json", action="store_true")

    pub = sub.add_parser("publish", help="upload a babai checkpoint with an auto-generated model card")
    pub.add_argument("checkpoint", help="checkpoint folder (from `hf-babai quantize` or save_pretrained)")
    pub.add_argument("repo_id", help="org/name or name (the token's user)")
    pub.add_argument("--base-model", default=None, help="Hub id of the original model, for the card")
    pub.add_argument("--private", action="store_true")
    pub.add_argument("--revision", default=None, help="branch to commit to")
    pub.add_argument("--message", default=None, help="commit message")
    pub.add_argument("--card-template", default=None, help="Jinja card template instead of the default")
    pub.add_argument("--license", default=None)
    pub.add_argument(
        "--eval-results",
        default=None,
        help="eval_results.json for the card (default: the checkpoint's own, if it records these weights)",
    )
    pub.add_argument(
        "--baseline-eval-results",
        default=None,
        help="the original model's eval_results.json (hf-babai eval ORIGINAL --save), shown beside this model's",
    )
    pub.add_argument(
        "--install", default=None, help='install command for the card, e.g. pip install "hf-babai @ git+URL"'
    )
    pub.add_argument("--timeout", type=float, default=60.0, help="seconds a Hub request may stall (default: 60)")
    pub.add_argument("--dry-run", action="store_true", help="print the files and the card; upload nothing")

    ev = sub.add_parser("eval", help="evaluate a babai checkpoint (or the original model, as the card's baseline)")
    ev.add_argument("checkpoint", help="checkpoint or model folder")
    ev.add_argument("--tasks", nargs="+", default=["babai_ppl"], help="lm-eval tasks (babai_ppl is offline)")
    ev.add_argument("--limit", type=float, default=None, help="documents per task")
    ev.add_argument("--text-file", default=None, help="text for babai_ppl instead of the built-in one")
    ev.add_argument("--save", action="store_true", help="write eval_results.json into the checkpoint folder")

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {
        "demo": _demo,
        "quantize": _quantize,
        "export": _export,
        "info": _info,
        "publish": _publish,
        "eval": _eval,
    }
    try:
        return commands[args.command](args)
    except (CliError, ValueError, OSError) as e:
        print(f"error: {e}{_resume_hint(args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the staged output folder is removed on the way out: nothing half-written remains
        kept = _resume_hint(args) or "; no partial output was left behind"
        print(f"interrupted: `hf-babai {args.command}` stopped{kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
