"""Publish → Hub → reload, lm-eval evaluation and the optimum-style API, on real SmolLM2-135M (offline).

The Hub is ``local_hub.LocalHub`` on 127.0.0.1, spoken to over real HTTP by the real huggingface_hub client
and transformers. huggingface_hub reads ``HF_ENDPOINT`` at import, so every Hub scenario runs in a child
process started with the test server's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_babai
from hf_babai import assets
from hf_babai.perplexity import calibration_windows
from tests.child import child_error

from .local_hub import LocalHub

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_secret_7c1e9a"
BASE = "HuggingFaceTB/SmolLM2-135M"

HUB_SCRIPT = r"""
import json, os, sys, torch
import hf_babai
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForCausalLM
ckpt, ids_file, out = sys.argv[1:4]
ids = torch.load(ids_file)
res = {}
# a wrong or missing token fails before any upload work
try:
    hf_babai.publish(ckpt, "tester/wrong-token", token="hf_not_the_token")
except hf_babai.PublishError as e:
    res["wrong_token"] = str(e)
good = os.environ.pop("HF_TOKEN")
try:
    hf_babai.publish(ckpt, "tester/no-token")
except hf_babai.PublishError as e:
    res["no_token"] = str(e)
os.environ["HF_TOKEN"] = good
try:
    hf_babai.publish(ckpt, "someone-else/repo")
except hf_babai.PublishError as e:
    res["other_namespace"] = str(e)
evals = [{"task_type": "text-generation", "dataset_type": "babai_ppl", "dataset_name": "babai_ppl",
          "metric_type": "word_perplexity", "metric_value": 31.5}]
res["url"] = hf_babai.publish(ckpt, "smol-babai", base_model=sys.argv[4], eval_results=evals)
model = AutoModelForCausalLM.from_pretrained("tester/smol-babai")
with torch.no_grad():
    torch.save(model(ids).logits, out + "/hub_logits.pt")
res["files"] = sorted(HfApi().list_repo_files("tester/smol-babai"))
# the Python path of the README: publish a model object with its tokenizer, to a new branch of a private repo
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(ckpt)
hf_babai.publish(model, "smol-object", tokenizer=tok, base_model=sys.argv[4], private=True, revision="v1")
res["object_files"] = sorted(HfApi().list_repo_files("tester/smol-object", revision="v1"))
obj = AutoModelForCausalLM.from_pretrained("tester/smol-object", revision="v1")
with torch.no_grad():
    torch.save(obj(ids).logits, out + "/object_logits.pt")
res["object_private"] = HfApi().model_info("tester/smol-object").private
# transformers' own push_to_hub: to the published repo it keeps our card; to a new repo it uploads a checkpoint
# that reloads (with transformers' generic card)
model.add_model_tags(["pushed-again"])  # a change, so transformers really rewrites the card in this commit
model.push_to_hub("tester/smol-babai")
card = ModelCard.load("tester/smol-babai")
res["card_after_push"], res["tags_after_push"] = card.text, card.data.tags
model.push_to_hub("tester/smol-plain")
again = AutoModelForCausalLM.from_pretrained("tester/smol-plain")
with torch.no_grad():
    torch.save(again(ids).logits, out + "/plain_logits.pt")
print(json.dumps(res))
"""


FAST = {"scale_method": "minmax"}  # half the time of the default scale search, which nothing here depends on


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """SmolLM2 4-bit g64 quantized with the optimum-style API, saved with its tokenizer."""
    src = assets.ensure_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(src)
    calib = calibration_windows(tok, assets.calibration_text(), n=4, seqlen=128)
    tmp = tmp_path_factory.mktemp("publish")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    quantizer = hf_babai.BabaiQuantizer(bits=4, group_size=64, dataset=calib, **FAST)
    model = quantizer.quantize_model(model, tok)
    quantizer.save(model, tmp / "ckpt")
    ids = calibration_windows(tok, assets.eval_text(), n=2, seqlen=64)
    torch.save(ids, tmp / "ids.pt")
    return {"src": src, "tok": tok, "calib": calib, "model": model, "tmp": tmp, "ids": ids}


def test_optimum_style_api_equals_quantize_on_load(quantized):
    cfg = hf_babai.BabaiConfig(bits=4, group_size=64, dataset=quantized["calib"], **FAST)
    onload = AutoModelForCausalLM.from_pretrained(quantized["src"], quantization_config=cfg, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(quantized["tmp"] / "ckpt")
    with torch.no_grad():
        ref = quantized["model"](quantized["ids"]).logits
        assert torch.equal(onload(quantized["ids"]).logits, ref)
        assert torch.equal(reloaded(quantized["ids"]).logits, ref)
    assert (quantized["tmp"] / "ckpt" / "quant_log.csv").read_text().count("\n") == 211
    # optimum's OptimumQuantizer flow: from_pretrained(model) then quantize(save_dir) gives the same checkpoint
    fp = AutoModelForCausalLM.from_pretrained(quantized["src"], dtype=torch.float32).eval()
    bound = hf_babai.BabaiQuantizer.from_pretrained(fp, bits=4, group_size=64, dataset=quantized["calib"], **FAST)
    with pytest.raises(ValueError, match="file_prefix"):
        bound.quantize(quantized["tmp"] / "opt", file_prefix="x")
    bound.tokenizer = quantized["tok"]
    saved = bound.quantize(quantized["tmp"] / "opt")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(saved)(quantized["ids"]).logits, ref)
    by_path = hf_babai.BabaiQuantizer.from_pretrained(quantized["src"], bits=3, dataset="austen")
    assert by_path.model is not None and by_path.tokenizer is not None and by_path.config.bits == 3
    with pytest.raises(ValueError, match="no model bound"):
        hf_babai.BabaiQuantizer(bits=4, dataset="austen").quantize(quantized["tmp"] / "none")
    # GPTQ options that would change the result are refused, harmless ones accepted
    # GPTQ's true_sequential is passed on (hf_babai's default is None, the engine's auto schedule)
    assert hf_babai.BabaiQuantizer(bits=4, dataset="austen", true_sequential=True).config.true_sequential
    assert hf_babai.BabaiQuantizer(bits=4, dataset="austen", true_sequential=False).config.true_sequential is False
    assert hf_babai.BabaiQuantizer(bits=4, dataset="austen").config.true_sequential is None
    with pytest.raises(ValueError, match=r"true_sequential=True.*batch_size=4"):
        hf_babai.BabaiQuantizer(bits=4, dataset="austen", true_sequential=True, batch_size=4)
    with pytest.raises(ValueError, match="Hub dataset name"):
        hf_babai.BabaiQuantizer(bits=4, dataset="wikitext2")
    q = hf_babai.BabaiQuantizer(bits=3, dataset="austen", desc_act=True, use_cuda_fp16=True)
    assert q.config.order == "act-order" and hf_babai.BabaiQuantizer.from_dict(q.to_dict()).config.bits == 3
    # GPTQQuantizer's format="gptq" is our GPTQ-compatible int format; the no-clipping formats pass through
    assert hf_babai.BabaiQuantizer(dataset="austen", format="gptq").config.format == "int"
    h = hf_babai.BabaiQuantizer(dataset="austen", format="hptq", target_bpw=3.125)
    assert hf_babai.BabaiQuantizer.from_dict(h.to_dict()).config.target_bpw == 3.125
    with pytest.raises(ValueError, match="format='awq'"):
        hf_babai.BabaiQuantizer(dataset="austen", format="awq")


def test_publish_reload_and_card_through_a_real_http_hub(quantized, tmp_path):
    hub = LocalHub(tmp_path / "hub", token=TOKEN).start()
    try:
        env = dict(os.environ)
        env.update(
            HF_ENDPOINT=hub.url,
            HF_TOKEN=TOKEN,
            HF_HOME=str(tmp_path / "hf_home"),
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            NO_PROXY="127.0.0.1,localhost",
        )
        env.pop("HF_HUB_OFFLINE", None)
        args = [sys.executable, "-c", HUB_SCRIPT, str(quantized["tmp"] / "ckpt"), str(quantized["tmp"] / "ids.pt")]
        proc = subprocess.run([*args, str(tmp_path), BASE], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 0, child_error(proc)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        # the CLI: a rejected token is a one-line error and exit code 1, a good one publishes
        cli = [sys.executable, "-m", "hf_babai", "publish", str(quantized["tmp"] / "ckpt"), "cli-repo"]
        bad = subprocess.run(cli, capture_output=True, text=True, env={**env, "HF_TOKEN": "hf_nope"}, cwd=tmp_path)
        good = subprocess.run([*cli, "--base-model", BASE], capture_output=True, text=True, env=env, cwd=tmp_path)
    finally:
        hub.stop()
    assert "rejected the token" in res["wrong_token"] and "401" in res["wrong_token"]
    assert "no Hugging Face token" in res["no_token"]
    assert "refused the upload to someone-else/repo (403" in res["other_namespace"]
    assert "can write to that namespace" in res["other_namespace"]
    assert "tester/wrong-token" not in hub.repos and "tester/no-token" not in hub.repos  # nothing was created
    bad_token_calls = [(m, p) for m, p, _ in hub.requests if "wrong-token" in p or "no-token" in p]
    assert not bad_token_calls, bad_token_calls  # not even a repo lookup or pre-upload call for those repos
    assert bad.returncode == 1 and "error: the Hub rejected the token (401" in bad.stderr, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr and "hf_nope" not in bad.stderr
    assert good.returncode == 0 and "published: " in good.stdout, child_error(good)
    assert "tester/cli-repo" in hub.repos
    assert "tester/smol-babai/commit/" in res["url"]
    for f in ("config.json", "model.safetensors", "quant_log.csv", "tokenizer.json", "README.md"):
        assert f in res["files"], res["files"]
    # the reloaded Hub model is the local model, bit for bit
    with torch.no_grad():
        ref = quantized["model"](quantized["ids"]).logits
    assert torch.equal(torch.load(tmp_path / "hub_logits.pt"), ref)
    assert torch.equal(torch.load(tmp_path / "plain_logits.pt"), ref)
    assert torch.equal(torch.load(tmp_path / "object_logits.pt"), ref)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):  # no quant_log.csv: this model
        assert f in res["object_files"], res["object_files"]  # was loaded, not quantized, in that process
    assert res["object_private"] is True and "v1" in hub.repos["tester/smol-object"].refs
    # the card as the Hub serves it parses with huggingface_hub's own validation (model-index included)
    repo = hub.repos["tester/smol-babai"]
    assert repo.commits[repo.refs["main"]]["model.safetensors"].lfs  # the weights went through the LFS endpoints
    readme = hub.blob(repo.commits[repo.refs["main"]]["README.md"].sha256).decode()
    card = ModelCard(readme)
    assert card.data.base_model == BASE and card.data.base_model_relation == "quantized"
    assert card.data.quantization["bits"] == 4 and card.data.quantization["quant_method"] == "babai"
    assert card.data.eval_results[0].metric_value == 31.5
    assert "hf_babai" in card.data.tags and "4-bit" in card.data.tags
    assert 'from_pretrained("tester/smol-babai")' in card.text
    assert "Per-layer error vs Babai's bound" in card.text and "| layers | 210 |" in card.text
    # model.push_to_hub kept our card (it loads the existing one and only adds tags)
    assert "Per-layer error vs Babai's bound" in res["card_after_push"]
    assert "pushed-again" in res["tags_after_push"] and "hf_babai" in res["tags_after_push"]
    assert len(repo.commits) == 3  # creation, publish, and the push (transformers skips a push that changes nothing)
    plain = hub.repos["tester/smol-plain"]
    plain_card = ModelCard(hub.blob(plain.commits[plain.refs["main"]]["README.md"].sha256).decode())
    assert "hf_babai" in plain_card.data.tags  # transformers' generic card, tagged by the quantizer
    # the token is nowhere: not in any stored file, not in the logs
    assert TOKEN not in proc.stdout + proc.stderr + good.stdout + good.stderr
    for blob in (tmp_path / "hub" / "blobs").iterdir():
        assert TOKEN.encode() not in blob.read_bytes()


def test_card_template_and_bad_input(quantized, tmp_path):
    ckpt = quantized["tmp"] / "ckpt"
    tpl = tmp_path / "mine.md"
    tpl.write_text("---\n{{ card_data }}\n---\n# {{ repo_id }}: {{ q.bits }}-bit at {{ q.bits_per_weight }} bpw\n")
    card = hf_babai.build_card(ckpt, "me/x", base_model=BASE, template=tpl)
    assert card.text.strip() == "# me/x: 4-bit at 4.25 bpw" and card.data.base_model == BASE
    with pytest.raises(ValueError, match="not a Hub repo id"):
        hf_babai.build_card(ckpt, "me/x", base_model="/local/path")
    with pytest.raises(ValueError, match="not a babai checkpoint"):
        hf_babai.build_card(quantized["src"], "me/x")
    with pytest.raises(ValueError, match="metric_value"):
        hf_babai.build_card(ckpt, "me/x", eval_results=[{"metric_type": "ppl"}])


def test_evaluate_with_lm_eval_offline_and_the_unmodified_cli(quantized, tmp_path):
    tok = quantized["tok"]
    q = hf_babai.evaluate(quantized["model"], tok, limit=1)
    fp_model = AutoModelForCausalLM.from_pretrained(quantized["src"], dtype=torch.float32).eval()
    fp = hf_babai.evaluate(fp_model, tok, limit=1)
    qw, fw = q.results["babai_ppl"]["word_perplexity"], fp.results["babai_ppl"]["word_perplexity"]
    # 4-bit g64 costs a little perplexity, not a lot
    assert 1.0 < qw / fw < 1.5, (qw, fw)
    b = q.results["babai_ppl"]
    assert abs(b["bits_per_byte"] - torch.log2(torch.tensor(b["byte_perplexity"])).item()) < 1e-6
    assert {e.metric_type for e in q.eval_results} == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    # lm-eval's own CLI (through the hf-babai-lm-eval wrapper that imports hf_babai first) on the checkpoint
    out = tmp_path / "lm_eval_out"
    exe = Path(sys.executable).parent / "hf-babai-lm-eval"
    cmd = [str(exe), "--model", "hf", "--model_args", f"pretrained={quantized['tmp'] / 'ckpt'},dtype=float32"]
    cmd += ["--tasks", "babai_ppl", "--limit", "1", "--device", "cpu", "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, child_error(proc)
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["babai_ppl"]
    assert abs(results["word_perplexity,none"] - qw) < 1e-6 * qw
    # hf-babai eval --save writes the card-ready results that hf-babai publish picks up
    ev = subprocess.run(
        [sys.executable, "-m", "hf_babai", "eval", str(quantized["tmp"] / "ckpt"), "--limit", "1", "--save"],
        capture_output=True,
        text=True,
    )
    assert ev.returncode == 0, child_error(ev)
    saved = json.loads((quantized["tmp"] / "ckpt" / "eval_results.json").read_text())
    assert abs(saved["results"]["babai_ppl"]["word_perplexity"] - qw) < 1e-6 * qw
    assert "word_perplexity" in ev.stdout
    # ...in the form the card takes (what `hf-babai publish` passes on): model-index with the measured value
    card = hf_babai.hub.build_card(quantized["tmp"] / "ckpt", "tester/smol", eval_results=saved["eval_results"])
    index = {e.metric_type: e.metric_value for e in ModelCard(str(card)).data.eval_results}
    assert abs(index["word_perplexity"] - qw) < 1e-6 * qw and "bits_per_byte" in index
    (quantized["tmp"] / "ckpt" / "eval_results.json").unlink()


def test_builtin_task_text_is_packaged_and_custom_text_works(tmp_path):
    assert hf_babai.eval.builtin_text().read_text().startswith("Chapter 1")
    txt = tmp_path / "t.txt"
    txt.write_text("One short paragraph.\n\nAnother one.\n")
    folder = hf_babai.eval.ppl_task(txt, name="mine", folder=tmp_path / "task")
    rows = (folder / "mine.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["text"].startswith("One short")
    assert str((folder / "mine.jsonl").resolve()) in (folder / "mine.yaml").read_text()
    with pytest.raises(ValueError, match="does not exist"):
        hf_babai.eval.ppl_task(tmp_path / "missing.txt")


def test_lm_eval_wrapper_keeps_a_users_include_path_next_to_the_builtin_task(tmp_path):
    """``hf-babai-lm-eval --include_path MINE --tasks mine,babai_ppl`` must see both folders: lm-eval's CLI turns
    one ``--include_path`` string into one path, so joining the two there (the old wrapper did) found neither."""
    (tmp_path / "t.txt").write_text("A paragraph.\n")
    mine = hf_babai.eval.ppl_task(tmp_path / "t.txt", name="mine", folder=tmp_path / "mine")
    code = f"""
import hf_babai.eval as ev
from lm_eval.tasks import TaskManager
ev.include_builtin_tasks(ev.ppl_task())
ev.include_builtin_tasks(ev.ppl_task())  # idempotent
with_user = TaskManager(include_path={str(mine)!r}).all_tasks
alone = TaskManager().all_tasks
assert "mine" in with_user and "babai_ppl" in with_user, [t for t in with_user if "mine" in t or "babai" in t]
assert "babai_ppl" in alone and "mine" not in alone
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), child_error(out)


def test_wheel_ships_the_builtin_task_text_and_the_card_template(tmp_path):
    """The offline lm-eval task and the model card must work from an installed wheel, not only from a checkout."""
    import zipfile

    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w"]
    proc = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, child_error(proc)
    names = zipfile.ZipFile(next(tmp_path.glob("hf_babai-*.whl"))).namelist()
    shipped = (
        "hf_babai/data/persuasion_ch1-4.txt",
        "hf_babai/data/austen_calibration.txt.xz",
        "hf_babai/model_cards/babai.md",
        "hf_babai/eval.py",
        "hf_babai/engine/schedules.py",
    )
    for f in (*shipped, "hf_babai/kernels/dense.py", "hf_babai/kernels/huffman.py"):  # the Triton sources
        assert f in names, f
    assert not any(n.startswith("kernels/") for n in names)  # Hugging Face's `kernels` package owns that name
    assert not any(n.startswith(("tests/", "hf_babai/solver/reference")) for n in names)  # test oracles stay out
