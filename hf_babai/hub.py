"""Publishing to the Hugging Face Hub: checkpoint + tokenizer + ``quant_log.csv`` + an auto-generated card, one commit.

Only the files a checkpoint is made of go up (:func:`checkpoint_files`); anything else in the folder (notes,
``.env``, an old ``eval_results.json``) is listed as skipped. The same commit deletes the repo's files that the
new checkpoint does not have, so the Hub never serves a mix of two versions. Every HTTP call has a timeout, and a
Hub that is down or stalls ends in one line naming the endpoint.

Why not ``model.push_to_hub``: transformers writes a generic card (``library_name: transformers``, no
quantization facts) into every push to a repo that has none. :func:`publish` writes the checkpoint and our
card in a single commit instead; a later ``model.push_to_hub`` to the same repo loads the existing card and
only adds tags, so the card survives (tested).

The token is checked (``whoami``) before anything is saved or uploaded, and never written anywhere: not in
the card, not in logs, not in any saved file.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    get_token,
)
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import _http as hub_http

from .hf import write_quant_log
from .hf.files import checkpoint_files
from .hf.summary import checkpoint_summary

log = logging.getLogger(__name__)
# the HTTP client huggingface_hub itself uses: httpx2 in 2.x, httpx in 1.x (the `hub` extra admits both)
httpx = getattr(hub_http, "httpx2", None) or hub_http.httpx
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Repo files a new checkpoint never deletes (the Hub's own LFS rules).
KEEP_IN_REPO = (".gitattributes",)
DEFAULT_TIMEOUT = 60.0
#: A Hub that is down, refuses connections or stalls (huggingface_hub raises httpx's errors, or ConnectionError).
NETWORK_ERRORS = (httpx.TransportError, ConnectionError, TimeoutError)


class PublishError(RuntimeError):
    """Publishing cannot start or failed; the message says what to fix."""


@dataclass
class PublishPlan:
    """What :func:`publish` uploads, skips and deletes; ``hf-babai publish --dry-run`` prints it."""

    repo_id: str
    revision: str | None
    upload: list[str]
    skipped: list[str]
    delete: list[str]
    card: str = field(repr=False)
    generated: dict[str, str] = field(default_factory=dict, repr=False)  # written by publish: card, plot

    def against(self, repo_files: Iterable[str]) -> PublishPlan:
        """The same upload against a repo that holds ``repo_files``: those the checkpoint does not have are deleted
        (``.gitattributes`` stays)."""
        new = set(self.upload)
        return replace(self, delete=sorted(f for f in repo_files if f not in new and f not in KEEP_IN_REPO))

    def lines(self) -> list[str]:
        """The plan as text, one file a line."""
        out = [f"repo {self.repo_id}" + (f" (branch {self.revision})" if self.revision else "")]
        out += [f"  upload  {f}" for f in self.upload]
        out += [f"  delete  {f} (not in the new checkpoint)" for f in self.delete]
        out += [f"  skip    {f} (not part of a checkpoint)" for f in self.skipped]
        return out


@contextlib.contextmanager
def hub_timeout(seconds: float) -> Iterator[None]:
    """huggingface_hub's shared HTTP client with a timeout per request (its default waits forever on a stalled
    Hub); the previous client factory is restored afterwards. Uploads keep huggingface_hub's own retries."""

    def factory() -> httpx.Client:
        client = hub_http.default_client_factory()
        client.timeout = httpx.Timeout(seconds, connect=min(seconds, 10.0))
        return client

    previous = hub_http._GLOBAL_CLIENT_FACTORY
    hub_http.set_client_factory(factory)
    try:
        yield
    finally:
        hub_http.set_client_factory(previous)


def _unreachable(endpoint: str, e: Exception, when: str) -> PublishError:
    if isinstance(e, httpx.TimeoutException):
        what, fix = "did not answer in time", "try again later or pass a longer timeout (--timeout)"
    else:
        what, fix = "cannot be reached", "check the network and the endpoint (HF_ENDPOINT)"
    return PublishError(f"the Hub at {endpoint} {what} ({type(e).__name__}) {when}; {fix}")


def install_line(given: str | None = None) -> str | None:
    """The card's install command: ``given``, else where this hf_babai was installed from when pip recorded a
    repository or archive URL (``pip install "hf-babai @ git+URL@COMMIT"``), else ``None`` (hf_babai is not on
    PyPI, so ``pip install hf-babai`` would not work for a reader)."""
    if given:
        return given
    import importlib.metadata

    try:
        raw = importlib.metadata.distribution("hf-babai").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not raw:
        return None
    info = json.loads(raw)
    url = info.get("url", "")
    if url.startswith("file:"):
        return None  # a local checkout: no address a reader could use
    vcs = info.get("vcs_info")
    if vcs:
        return f'pip install "hf-babai @ {vcs["vcs"]}+{url}@{vcs["commit_id"]}"'
    return f'pip install "hf-babai @ {url}"'


PLOT_FILE = "quant_log.svg"


def error_plot_svg(log_file: str | Path) -> str | None:
    """A small SVG of each layer's proxy loss over its Babai bound (from ``quant_log.csv``), for the card: one bar
    per layer in quantization order, a line at 1 (the bound, which holds wherever nothing was clipped), clipped
    layers in orange. Plain SVG text, so the card needs no plotting library. ``None`` without a usable log."""
    import csv
    import math

    log_file = Path(log_file)
    if not log_file.is_file():
        return None
    with open(log_file) as f:
        rows = list(csv.DictReader(f))
    ratios = []
    for r in rows:
        loss, bound = float(r["loss"]), float(r["bound"])
        if not (math.isfinite(loss) and math.isfinite(bound)) or bound <= 0:
            return None  # round-to-nearest has no bound to draw
        ratios.append((loss / bound, int(r["clipped"]) > 0))
    if not ratios:
        return None
    width, height, pad = 640, 180, 28
    top = max(1.25, max(r for r, _ in ratios) * 1.05)
    bar = (width - 2 * pad) / len(ratios)
    y = lambda v: height - pad - (height - 2 * pad) * min(v, top) / top  # noqa: E731

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="11">',
        f'<text x="{pad}" y="16">proxy loss / Babai bound, per layer ({len(ratios)} layers; orange: clipped)</text>',
    ]
    for i, (ratio, clipped) in enumerate(ratios):
        x = pad + i * bar
        color = "#e8821a" if clipped else "#3b73b9"
        parts.append(
            f'<rect x="{x:.2f}" y="{y(ratio):.2f}" width="{max(bar * 0.8, 0.5):.2f}" '
            f'height="{height - pad - y(ratio):.2f}" fill="{color}"/>'
        )
    parts.append(
        f'<line x1="{pad}" x2="{width - pad}" y1="{y(1):.2f}" y2="{y(1):.2f}" stroke="#c00" stroke-dasharray="4 3"/>'
    )
    parts.append(f'<text x="{width - pad + 2}" y="{y(1) + 4:.2f}">1</text>')
    parts.append(f'<text x="{pad}" y="{height - 8}">first layer</text>')
    parts.append(f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">last layer</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


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
    install: str | None = None,
    baseline_results: Iterable[EvalResult | dict] | None = None,
    plot: str | None = None,
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
    # the original model's figures on the same tasks and metrics, shown beside this model's
    baseline = {f"{e.dataset_name}|{e.metric_type}": e.metric_value for e in _eval_results(baseline_results)}
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
    install = install_line(install)
    if install is None:
        log.warning(
            "the card cannot say where to install hf_babai from (it is not on PyPI and this copy was installed from "
            "a local folder); pass install='pip install \"hf-babai @ git+URL\"' (--install) so readers can load it"
        )
    return ModelCard.from_template(
        data,
        template_path=str(path),
        model_title=name,
        repo_id=repo_id,
        base_model=base,
        q=q,
        evals=evals,
        baseline=baseline,
        install=install,
        plot=plot,
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


def _repo_files(api: HfApi, repo_id: str, revision: str | None, token: str | None) -> list[str]:
    """The files the repo serves now at ``revision`` (a missing branch starts from ``main``; no repo: none)."""
    try:
        return api.list_repo_files(repo_id, revision=revision, token=token)
    except RevisionNotFoundError:
        return _repo_files(api, repo_id, None, token)
    except RepositoryNotFoundError:
        return []


def _stage(model_or_dir: Any, tokenizer: Any, tmp: Path) -> Path:
    """The folder to publish: the user's own (never written to) or a staged copy with the model/tokenizer saved."""
    if isinstance(model_or_dir, (str, Path)):
        folder = Path(model_or_dir)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a checkpoint folder (no config.json)")
        if tokenizer is None:
            return folder
        staged = tmp / "checkpoint"
        shutil.copytree(folder, staged)
    else:
        staged = tmp / "checkpoint"
        model_or_dir.save_pretrained(staged)
        try:
            write_quant_log(model_or_dir, staged / "quant_log.csv")
        except ValueError:
            log.info("no per-layer records in this process; the card will not have the per-layer table")
    if tokenizer is not None:
        tokenizer.save_pretrained(staged)
    return staged


def plan_publish(
    folder: str | Path,
    repo_id: str,
    *,
    repo_files: Iterable[str] = (),
    revision: str | None = None,
    eval_results: Iterable[EvalResult | dict] | None = None,
    card_template: str | Path | None = None,
    base_model: str | None = None,
    license: str | None = None,
    install: str | None = None,
    baseline_results: Iterable[EvalResult | dict] | None = None,
) -> PublishPlan:
    """What publishing ``folder`` to ``repo_id`` does, given the files the repo has now: the checkpoint's files
    and the card go up, the repo's other files (except ``.gitattributes``) are deleted, the folder's other files
    are skipped. Validates the checkpoint (through the card) before anything touches the Hub."""
    svg = error_plot_svg(Path(folder) / "quant_log.csv")
    card = build_card(
        folder,
        repo_id,
        base_model=base_model,
        eval_results=eval_results,
        template=card_template,
        license=license,
        install=install,
        baseline_results=baseline_results,
        plot=PLOT_FILE if svg else None,
    )
    generated = {"README.md": str(card), **({PLOT_FILE: svg} if svg else {})}
    upload, skipped = checkpoint_files(folder)
    skipped = [f for f in skipped if f not in generated]  # the folder's own card/plot: replaced, not dropped
    plan = PublishPlan(repo_id, revision, [*upload, *generated], skipped, [], str(card), generated)
    return plan.against(repo_files)


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
    install: str | None = None,
    baseline_results: Iterable[EvalResult | dict] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    dry_run: bool = False,
) -> str | PublishPlan:
    """Uploads a babai checkpoint with its model card in one commit; returns the commit URL.

    The commit holds exactly the checkpoint's files (:func:`checkpoint_files`) and the card, and deletes the
    repo's files that this checkpoint does not have (a 3-bit version published over a 4-bit one leaves no 4-bit
    shard behind); skipped and deleted files are logged as warnings.

    Args:
        model_or_dir: a model quantized with hf_babai (saved to a temporary folder first, with its
            ``quant_log.csv`` when it was quantized in this process) or a checkpoint folder.
        repo_id: ``org/name`` (or ``name`` for the token's user); created if needed.
        tokenizer: saved beside the weights (a folder's own tokenizer files are uploaded as they are).
        eval_results: ``huggingface_hub.EvalResult`` objects or dicts, e.g. from :func:`hf_babai.evaluate`;
            written into the card as a table and as ``model-index``. Nothing is read from the folder.
        baseline_results: the original model's results on the same tasks, shown beside this model's.
        card_template: a Jinja template instead of ``model_cards/babai.md``.
        revision: branch to commit to (created from ``main`` if missing).
        base_model: the original model's Hub id, when the checkpoint's config does not name it.
        install: the card's command to install hf_babai (default: where this copy came from, when pip knows).
        timeout: seconds each HTTP request may wait for the Hub before it counts as stalled.
        dry_run: return the :class:`PublishPlan` (files, deletions, card) and change nothing on the Hub.
    """
    api = HfApi(endpoint=endpoint)
    where = api.endpoint
    with hub_timeout(timeout), tempfile.TemporaryDirectory(prefix="hf_babai_publish_") as tmp:
        try:
            tok, user = _check_token(api, token)
        except NETWORK_ERRORS as e:
            raise _unreachable(where, e, "while checking the token; nothing was uploaded") from None
        folder = _stage(model_or_dir, tokenizer, Path(tmp))
        if "/" not in repo_id:
            repo_id = f"{user}/{repo_id}"
        # the card validates the checkpoint, so a broken folder fails before the repo is created
        plan = plan_publish(
            folder,
            repo_id,
            revision=revision,
            eval_results=eval_results,
            card_template=card_template,
            base_model=base_model,
            license=license,
            install=install,
            baseline_results=baseline_results,
        )
        try:
            if dry_run:
                return plan.against(_repo_files(api, repo_id, revision, tok))
            repo_id = api.create_repo(repo_id, token=tok, private=private, exist_ok=True).repo_id
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, token=tok, exist_ok=True)
            plan = plan.against(_repo_files(api, repo_id, revision, tok))
            ops: list = [
                CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f))
                for f in plan.upload
                if f not in plan.generated
            ]
            ops += [CommitOperationAdd(path_in_repo=f, path_or_fileobj=t.encode()) for f, t in plan.generated.items()]
            ops += [CommitOperationDelete(path_in_repo=f) for f in plan.delete]
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
        except NETWORK_ERRORS as e:
            raise _unreachable(where, e, f"while uploading to {repo_id}; run publish again to finish") from None
    if plan.skipped:
        log.warning("not uploaded (not part of a checkpoint): %s", ", ".join(plan.skipped))
    if plan.delete:
        log.warning("deleted from %s (not in the new checkpoint): %s", repo_id, ", ".join(plan.delete))
    log.info("published %s (%d files)", repo_id, len(plan.upload))
    return info.commit_url
