"""The streamed save (``hf_babai.save_streamed``, what ``hf-babai quantize`` writes with): the quantized block
tensors are copied from the run folder, and the checkpoint is the one ``save_pretrained`` writes from memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.child import child_error

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def _quantized(src: Path, run_dir: Path | None):
    from transformers import AutoModelForCausalLM

    from hf_babai import BabaiConfig

    run = {} if run_dir is None else {"run_dir": str(run_dir)}
    cfg = BabaiConfig(bits=4, group_size=32, dataset=IDS, **run)
    return AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float32)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_writer_writes_the_bytes_safetensors_writes(tmp_path, monkeypatch, kernel_copy):
    """Tensors copied from separate files into one: the same file as safetensors' own ``save_file`` (tensor order
    by dtype then name, header, padding), for every dtype a checkpoint holds; copied by the kernel or, where it
    cannot, through a buffer of at most ``COPY_CHUNK`` bytes (made small here so that tensors span several)."""
    import hf_babai.hf.streamed as streamed

    monkeypatch.setattr(streamed, "COPY_CHUNK", 7)
    if not kernel_copy:
        monkeypatch.delattr(os, "copy_file_range")
    from safetensors.torch import save_file

    from hf_babai.hf.streamed import _Source, read_header, write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.10.w": torch.randn(3, 5, generator=g),
        "b.9.w": torch.randn(7, generator=g).to(torch.bfloat16),
        "a.qweight": torch.randint(-(2**31), 2**31 - 1, (4, 3), dtype=torch.int32, generator=g),
        "a.scales": torch.randn(2, 3, generator=g).to(torch.float16),
        "z.idx": torch.randint(0, 9, (5,), dtype=torch.int64, generator=g),
        "c.codes": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g),
        "c.s8": torch.randint(-100, 100, (3,), dtype=torch.int8, generator=g),
        "d.mask": torch.rand(6, generator=g) > 0.5,
        "e.f64": torch.randn(2, generator=g, dtype=torch.float64),
        "f.i16": torch.randint(-9, 9, (3,), dtype=torch.int16, generator=g),
    }
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    sources = {}
    for i, (name, t) in enumerate(tensors.items()):
        file = tmp_path / f"part{i}.safetensors"
        save_file({"x": t, "pad": torch.zeros(i + 1)}, file)  # data that is not copied, before or after it
        start, header = read_header(file)
        sources[name] = _Source(file, start, header["x"])
    write_safetensors(tmp_path / "got.safetensors", sources, {"format": "pt"})
    assert (tmp_path / "got.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_checkpoint_is_save_pretrained_byte_for_byte(tiny_env, tmp_path, tied):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    import hf_babai

    src = tiny_env["src"]
    if tied:  # the fixture's model has its own head; this one shares the embedding (left out of the file)
        torch.manual_seed(0)
        LlamaForCausalLM(AutoConfig.from_pretrained(src, tie_word_embeddings=True)).save_pretrained(tmp_path / "tied")
        src = tmp_path / "tied"
    model = _quantized(src, tmp_path / "run")
    model.save_pretrained(tmp_path / "ref")
    hf_babai.save_streamed(model, tmp_path / "got")
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "got").iterdir())
    for name in names:
        assert (tmp_path / "got" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert ("lm_head.weight" in _tensors(tmp_path / "got")) is not tied

    hf_babai.save_streamed(model, tmp_path / "shards", max_shard_size="30KB")  # several files and an index
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "shards").glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    ref, got = _tensors(tmp_path / "ref"), _tensors(tmp_path / "shards")
    assert sorted(ref) == sorted(got) == sorted(index["weight_map"])
    assert all(torch.equal(ref[k], got[k]) and ref[k].dtype == got[k].dtype for k in ref)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "shards")
    x = IDS[:2, :16]
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


def test_block_tensors_come_from_the_run_folder(tiny_env, tmp_path):
    """The copy is of the run folder's bytes, not of the model in memory (which the save never serializes)."""
    import hf_babai
    from hf_babai.engine.resume import BlockStore

    model = _quantized(tiny_env["src"], tmp_path / "run")
    q = model.model.layers[1].mlp.down_proj
    name = next(k for k, t in q.state_dict().items() if t.dtype == torch.int32)
    with torch.no_grad():
        getattr(q, name).zero_()  # in memory only: the run folder keeps what the run quantized
    hf_babai.save_streamed(model, tmp_path / "out")
    from safetensors.torch import load_file

    stored = load_file(BlockStore.block_file(tmp_path / "run", 1))[f"mlp.down_proj.{name}"]
    saved = _tensors(tmp_path / "out")[f"model.layers.1.mlp.down_proj.{name}"]
    assert torch.equal(saved, stored) and stored.any()


def test_refusals_name_the_fix(tiny_env, tmp_path):
    import hf_babai
    from hf_babai.engine.resume import RUN_FILE
    from hf_babai.hf.streamed import parse_size

    model = _quantized(tiny_env["src"], None)
    with pytest.raises(ValueError, match=r"BabaiConfig\(run_dir=\.\.\.\).*model\.save_pretrained\(out\)"):
        hf_babai.save_streamed(model, tmp_path / "a")
    model = _quantized(tiny_env["src"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"max_shard_size='5 parsecs' is not a size.*'5GB'"):
        hf_babai.save_streamed(model, tmp_path / "b", max_shard_size="5 parsecs")
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("2MiB") == 2 * 2**20 and parse_size(7) == 7
    run = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps({**run, "finished": 1}))  # a run that did not finish
    with pytest.raises(ValueError, match=r"does not hold a finished run of this model \(1 of 2 blocks done"):
        hf_babai.save_streamed(model, tmp_path / "c")
    assert not (tmp_path / "c" / "model.safetensors").exists()


def test_cli_writes_shards_that_reload(tiny_env, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    base = [sys.executable, "-m", "hf_babai", "quantize", str(tiny_env["src"]), "--quiet", "--bits", "4"]
    base += ["--group-size", "32", "--nsamples", "4", "--seqlen", "32"]
    bad = subprocess.run([*base, "--out", str(tmp_path / "x"), "--max-shard-size", "big"], capture_output=True,
                         text=True, env=env)  # fmt: skip
    assert bad.returncode == 1 and "--max-shard-size 'big' is not a size" in bad.stderr, child_error(bad)
    assert not (tmp_path / "x").exists()
    done = subprocess.run([*base, "--out", str(tmp_path / "q"), "--max-shard-size", "40KB"], capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert done.returncode == 0, child_error(done)
    out = tmp_path / "q"
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert not (out / ".hf_babai_rest").exists() and not (tmp_path / ".q.unfinished").exists()
    info = subprocess.run([sys.executable, "-m", "hf_babai", "info", str(out)], capture_output=True, text=True,
                          env=env)  # fmt: skip
    assert info.returncode == 0, child_error(info)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loads without missing or unexpected tensors (checked on load)


def _mapped_file(t: torch.Tensor) -> str:
    """The file whose memory mapping holds ``t``'s data ('' or '[heap]' for anonymous memory)."""
    addr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= addr < hi:
            return parts[5].strip() if len(parts) > 5 else ""
    raise AssertionError("address not mapped")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_finished_blocks_read_from_their_files(tiny_env, tmp_path):
    """With a run folder, each finished block's packed tensors are memory-mapped from its block file (private
    memory does not grow with finished blocks); without one they are ordinary memory. Same logits either way."""
    from hf_babai.engine.resume import BlockStore
    from hf_babai.formats import quantized_modules

    mapped = _quantized(tiny_env["src"], tmp_path / "run")
    plain = _quantized(tiny_env["src"], None)
    for name, mod, _ in quantized_modules(mapped):
        b = int(name.split(".")[2])
        for t in mod.packed_buffers().values():
            assert _mapped_file(t) == str(BlockStore.block_file(tmp_path / "run", b).resolve()), name
    plain_files = {_mapped_file(t) for _, m, _ in quantized_modules(plain) for t in m.packed_buffers().values()}
    assert not any(f.startswith("/") for f in plain_files), plain_files  # anonymous memory or [heap]
    with torch.no_grad():
        assert torch.equal(mapped(IDS[:2]).logits, plain(IDS[:2]).logits)
