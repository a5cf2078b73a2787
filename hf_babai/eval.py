"""Evaluation through lm-eval (EleutherAI's harness), with an offline task built in.

lm-eval is the harness people compare quantized models with, so :func:`evaluate` runs it unchanged
(``HFLM`` around the in-memory model + ``simple_evaluate``) and returns plain numbers plus card-ready
``EvalResult`` objects for :func:`hf_babai.publish`.

The built-in task ``babai_ppl`` needs no Hub access: a local text (default: chapters 1–4 of Austen's
*Persuasion*, public domain, shipped in the package and used by neither the calibration nor the perplexity
benchmark), one document per chapter, scored by rolling log-likelihood into word perplexity, byte perplexity
and bits per byte — the metrics of lm-eval's own wikitext task. :func:`ppl_task` builds the same task from
any UTF-8 text file. lm-eval reads a task's data through a YAML with an absolute path, so the task folder is
written at run time (into a cache folder) rather than shipped.

The lm-eval CLI: ``hf-babai-lm-eval`` is lm-eval's own, unmodified command line run after ``import hf_babai``
(which registers ``quant_method="babai"``, without which lm-eval fails with "Unknown quantization type"),
with this package's task folder added to ``--include_path``. Same arguments as ``lm_eval``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import default_cache_dir, eval_text_file

BUILTIN_TASK = "babai_ppl"
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
  source: {source}
"""


@dataclass
class Evaluation:
    """lm-eval results as plain numbers (``results[task][metric]``) and as ``EvalResult`` for model cards."""

    results: dict[str, dict[str, float]]
    eval_results: list = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        rows = [f"{'task':<24} {'metric':<20} {'value':>12}"]
        for task, metrics in self.results.items():
            rows += [f"{task:<24} {m:<20} {v:>12.4f}" for m, v in metrics.items()]
        return "\n".join(rows)


def builtin_text() -> Path:
    return eval_text_file()


def _documents(text: str) -> list[str]:
    """One document per chapter when the text has "Chapter N" headings, else per blank-line-separated block
    of about 2,000 words (rolling log-likelihood scores each document on its own)."""
    parts = [p.strip() for p in re.split(r"\n(?=Chapter \d+\n)", text) if p.strip()]
    if len(parts) > 1:
        return parts
    docs, cur, words = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        cur.append(para.strip())
        words += len(para.split())
        if words >= 2000:
            docs.append("\n\n".join(cur))
            cur, words = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return [d for d in docs if d]


def ppl_task(text_file: str | Path | None = None, name: str = BUILTIN_TASK, folder: str | Path | None = None) -> Path:
    """Writes an lm-eval task folder (``<name>.yaml`` + ``<name>.jsonl``) for a local text; returns the folder
    to pass as ``include_path``. Default text: the packaged *Persuasion* chapters."""
    src = Path(text_file) if text_file is not None else builtin_text()
    if not src.is_file():
        raise ValueError(f"text file {src} does not exist; pass a UTF-8 .txt file")
    text = src.read_text(encoding="utf-8")
    docs = _documents(text)
    if not docs:
        raise ValueError(f"text file {src} is empty")
    if not re.fullmatch(r"[A-Za-z_][\w]*", name):
        raise ValueError(f"task name {name!r} must be a Python-style identifier")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    if folder is None:
        folder = default_cache_dir() / "lm_eval_tasks" / f"{name}-{digest}"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data.resolve(), source=src.name))
    return folder


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: list[str] | tuple[str, ...] = (BUILTIN_TASK,),
    *,
    limit: int | float | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    text_file: str | Path | None = None,
    include_path: str | Path | list | None = None,
) -> Evaluation:
    """Runs lm-eval on an in-memory model (quantized or not) and returns its numbers.

    Args:
        tasks: lm-eval task names; ``"babai_ppl"`` is the offline built-in (its text: ``text_file``).
            Hub-hosted tasks (e.g. ``wikitext``, ``hellaswag``) work where the Hub is reachable.
        limit: documents per task (lm-eval's ``limit``), for quick checks.
        include_path: extra lm-eval task folders.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("evaluation needs lm-eval: pip install 'hf-babai[eval]'") from e
    from huggingface_hub import EvalResult

    paths = [str(ppl_task(text_file))] if BUILTIN_TASK in tasks else []
    if include_path is not None:
        paths += [str(p) for p in (include_path if isinstance(include_path, list) else [include_path])]
    manager = TaskManager(include_path=paths or None, include_defaults=any(t != BUILTIN_TASK for t in tasks))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
    )
    results: dict[str, dict[str, float]] = {}
    cards = []
    for task, metrics in out["results"].items():
        clean = {
            k.split(",")[0]: float(v)
            for k, v in metrics.items()
            if "," in k and "_stderr" not in k and isinstance(v, (int, float))
        }
        results[task] = clean
        for metric, value in clean.items():
            cards.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=task,
                    dataset_name=task,
                    metric_type=metric,
                    metric_value=value,
                    source_name=f"lm-eval {getattr(lm_eval, '__version__', '')}".strip(),
                    source_url=LM_EVAL_URL,  # the Hub requires a URL with a source name
                )
            )
    return Evaluation(results, cards, {"tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot})


def include_builtin_tasks(folder: str | Path) -> None:
    """Makes every lm-eval ``TaskManager`` in this process also index ``folder``, next to the user's own
    ``--include_path``.

    Why not edit the command line: lm-eval 0.4's CLI takes one ``--include_path`` string and turns it into one
    path (a joined ``a,b`` or ``a:b`` names no folder), while ``TaskManager`` itself accepts a list. So the
    ``hf-babai-lm-eval`` wrapper leaves the user's arguments exactly as typed and appends the built-in folder here."""
    import inspect

    from lm_eval import tasks

    init = tasks.TaskManager.__init__
    if getattr(init, "_babai_extra", None) == str(folder):
        return
    sig = inspect.signature(init)

    def with_builtin(self, *args: Any, **kwargs: Any) -> None:
        bound = sig.bind(self, *args, **kwargs)
        user = bound.arguments.get("include_path")
        paths = list(user) if isinstance(user, (list, tuple)) else ([user] if user else [])
        bound.arguments["include_path"] = [*paths, str(folder)]
        init(*bound.args, **bound.kwargs)

    with_builtin._babai_extra = str(folder)  # type: ignore[attr-defined]
    tasks.TaskManager.__init__ = with_builtin


def lm_eval_main() -> None:
    """``hf-babai-lm-eval``: lm-eval's CLI after ``import hf_babai``, with the built-in task folder included
    (also alongside a user's own ``--include_path``)."""
    import hf_babai  # noqa: F401  (registers quant_method="babai" with transformers)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise SystemExit("hf-babai-lm-eval needs lm-eval: pip install 'hf-babai[eval]'") from e
    include_builtin_tasks(ppl_task())
    cli_evaluate()
