"""Publishing to the Hugging Face Hub: checkpoint + tokenizer + ``quant_log.csv`` + an auto-generated card, one commit.

Why not ``model.push_to_hub``: transformers writes a generic card (``library_name: transformers``, no
quantization facts) into every push to a repo that has none. :func:`publish` writes the checkpoint and our
card in a single commit instead; a later ``model.push_to_hub`` to the same repo loads the existing card and
only adds tags, so the card survives (tested).

The token is checked (``whoami``) before anything is saved or uploaded, and never written anywhere: not in
the card, not in logs, not in any saved file.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError

from .hf import write_quant_log
from .hf.summary import checkpoint_summary

log = logging.getLogger(__name__)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CARD_FILES = ("README.md",)


class PublishError(RuntimeError):
    """Publishing cannot start or failed; the message says what to fix."""


def default_template() -> Path:
    """The packaged default card template (``model_cards/babai.md`` in the repository)."""
    return Path(str(importlib.resources.files("hf_babai.model_cards").joinpath("babai.md")))


def _eval_results(items: Iterable[EvalResult | dict] | None) -> list[EvalResult]:
    out = []
    for e in items or ():
        if isinstance(e, EvalResult):
            out.append(e)
        elif isinstance(e, dict):
            try:
                out.append(EvalResult(**e))
            except TypeError as err:
                raise ValueError(
                    f"eval_results entry {e!r} is not an EvalResult: {err}; give task_type, dataset_type, "
                    "dataset_name, metric_type and metric_value (hf_babai.evaluate returns ready ones)"
                ) from err
        else:
            raise ValueError(f"eval_results entries must be EvalResult objects or dicts, not {type(e).__name__}")
    return out


def _base_model(checkpoint: Path, base_model: str | None) -> str | None:
    """``base_model`` for the card: the argument, else the config's ``_name_or_path`` when it is a Hub id (a
    local path would fail the Hub's metadata validation)."""
    if base_model is not None:
        if not REPO_ID.match(base_model):
            raise ValueError(f"base_model={base_model!r} is not a Hub repo id like 'org/name'")
        return base_model
    import json

    name = json.loads((checkpoint / "config.json").read_text()).get("_name_or_path") or ""
    if REPO_ID.match(name) and not Path(name).exists():
        return name
    log.warning("the card has no base_model: pass base_model='org/name' to link the original model")
    return None


def build_card(
    checkpoint: str | Path,
    repo_id: str,
    *,
    base_model: str | None = None,
    eval_results: Iterable[EvalResult | dict] | None = None,
    template: str | Path | None = None,
    license: str | None = None,
) -> ModelCard:
    """Renders the model card of a saved babai checkpoint (validated first; see ``checkpoint_summary``).

    The YAML header carries ``base_model`` + ``base_model_relation: quantized`` (the Hub's model tree lists
    the repo as a quantization of its base), library and tags, a ``quantization`` block and, given
    ``eval_results``, a ``model-index``.
    """
    checkpoint = Path(checkpoint)
    q = checkpoint_summary(checkpoint)
    base = _base_model(checkpoint, base_model)
    evals = _eval_results(eval_results)
    name = repo_id.split("/")[-1]
    data = ModelCardData(
        base_model=base,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=["hf_babai", "babai", "quantized", *q["tags"]],
        model_name=name if evals else None,
        eval_results=evals or None,
        quantization={
            "quant_method": "babai",
            "method": q["method"],
            "order": q["order"],
            **q["card"],
            "bits_per_weight": q["bits_per_weight"],
            "bits_per_weight_all": q["bits_per_weight_all"],
        },
    )
    if base is not None:
        data.base_model_relation = "quantized"
    path = Path(template) if template is not None else default_template()
    if not path.is_file():
        raise ValueError(f"card template {path} does not exist")
    return ModelCard.from_template(
        data, template_path=str(path), model_title=name, repo_id=repo_id, base_model=base, q=q, evals=evals
    )


def _check_token(api: HfApi, token: str | None) -> tuple[str, str]:
    """The token to use and its user name; a clear error for a missing or rejected token."""
    tok = token if token is not None else get_token()
    if not tok:
        raise PublishError(
            "no Hugging Face token: pass token=..., set HF_TOKEN or run `hf auth login` (publishing needs a "
            "token with write access)"
        )
    try:
        who = api.whoami(token=tok)
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        reason = e.server_message or str(e).splitlines()[0] or "no reason given"  # whoami: "Invalid user token."
        raise PublishError(
            f"the Hub rejected the token ({status}: {reason}); pass a valid token with write access "
            "(token=..., HF_TOKEN or `hf auth login`). Nothing was uploaded."
        ) from None
    return tok, who["name"]


def publish(
    model_or_dir: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    token: str | None = None,
    private: bool | None = None,
    eval_results: Iterable[EvalResult | dict] | None = None,
    card_template: str | Path | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Uploads a babai checkpoint with its model card in one commit; returns the commit URL.

    Args:
        model_or_dir: a model quantized with hf_babai (saved to a temporary folder first, with its
            ``quant_log.csv`` when it was quantized in this process) or a checkpoint folder.
        repo_id: ``org/name`` (or ``name`` for the token's user); created if needed.
        tokenizer: saved beside the weights (a folder's own tokenizer files are uploaded as they are).
        eval_results: ``huggingface_hub.EvalResult`` objects or dicts, e.g. from :func:`hf_babai.evaluate`;
            written into the card as a table and as ``model-index``.
        card_template: a Jinja template instead of ``model_cards/babai.md``.
        revision: branch to commit to (created from ``main`` if missing).
        base_model: the original model's Hub id, when the checkpoint's config does not name it.
    """
    api = HfApi(endpoint=endpoint)
    tok, user = _check_token(api, token)
    with tempfile.TemporaryDirectory(prefix="hf_babai_publish_") as tmp:
        if isinstance(model_or_dir, (str, Path)):
            folder = Path(model_or_dir)
            if not (folder / "config.json").is_file():
                raise ValueError(f"{folder} is not a checkpoint folder (no config.json)")
        else:
            folder = Path(tmp) / "checkpoint"
            model_or_dir.save_pretrained(folder)
            try:
                write_quant_log(model_or_dir, folder / "quant_log.csv")
            except ValueError:
                log.info("no per-layer records in this process; the card will not have the per-layer table")
        if tokenizer is not None:
            if isinstance(model_or_dir, (str, Path)):  # never write into the user's folder
                staged = Path(tmp) / "checkpoint"
                shutil.copytree(folder, staged)
                folder = staged
            tokenizer.save_pretrained(folder)
        if "/" not in repo_id:
            repo_id = f"{user}/{repo_id}"
        # the card validates the checkpoint, so a broken folder fails before the repo is created
        card = build_card(
            folder, repo_id, base_model=base_model, eval_results=eval_results, template=card_template, license=license
        )
        try:
            repo_id = api.create_repo(repo_id, token=tok, private=private, exist_ok=True).repo_id
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, token=tok, exist_ok=True)
            files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
            ops = [
                CommitOperationAdd(path_in_repo=f.relative_to(folder).as_posix(), path_or_fileobj=str(f))
                for f in files
                if f.relative_to(folder).as_posix() not in CARD_FILES
            ]
            ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
            info = api.create_commit(
                repo_id,
                ops,
                commit_message=commit_message or "Upload hf_babai quantized checkpoint",
                token=tok,
                revision=revision,
            )
        except HfHubHTTPError as e:
            status = getattr(e.response, "status_code", None)
            raise PublishError(
                f"the Hub refused the upload to {repo_id} ({status}: {e.server_message or e}); check that the token "
                f"can write to that namespace and that the repo id is right"
            ) from None
    log.info("published %s (%d files)", repo_id, len(ops))
    return info.commit_url
