"""Quantizing on several torch.distributed ranks (gloo, two CPU processes) gives the single-process model, byte for
byte; a rank that fails stops every rank with its message; the CLI's ``--nproc`` writes the same checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.child import child_error

IDS = torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(1))


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _spec(**kw):
    from hf_babai.spec import QuantSpec

    return QuantSpec(bits=4, group_size=32, true_sequential=False, **kw)


def _worker(rank: int, world: int, folder: str, fail_rank: int) -> None:
    """One rank: quantizes the tiny model and writes what it got (digest, records, bytes sent, error) to a file."""
    import torch.distributed as dist

    from hf_babai.engine import Ranks, quantize_model
    from hf_babai.spec import QuantSpec

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    out: dict = {}
    try:
        try:
            quantize_model(_model(), QuantSpec(bits=4, true_sequential=True), IDS, progress=False)
        except ValueError as e:
            out["true_sequential"] = str(e)
        model = _model()
        if rank == fail_rank:

            def boom(*_):
                raise ValueError("out of memory in block 1")

            model.model.layers[1].register_forward_pre_hook(boom)
        ranks = Ranks.current()
        log = Path(folder) / f"log-{rank}.csv"
        try:
            records = quantize_model(model, _spec(), IDS, progress=False, log_path=log, ranks=ranks)
            out.update(digest=_digest(model), loss=[r.stats["loss"] for r in records], sent=ranks.bytes_sent)
            out["tokens"] = [r.tokens for r in records]
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
        out["wrote_log"] = log.exists()
    finally:
        (Path(folder) / f"rank-{rank}.json").write_text(json.dumps(out))
        dist.destroy_process_group()


def _run_ranks(tmp_path: Path, world: int = 2, fail_rank: int = -1) -> list[dict]:
    mp.spawn(_worker, args=(world, str(tmp_path), fail_rank), nprocs=world, join=True)
    return [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(world)]


def test_two_gloo_ranks_give_the_single_process_model_byte_for_byte(tmp_path):
    from hf_babai.engine import quantize_model

    torch.set_num_threads(1)  # the ranks run one thread each: float results depend on the thread count
    model = _model()
    records = quantize_model(model, _spec(), IDS, progress=False)
    one = _digest(model)
    batched = _model()  # one sample per forward: the exact Hessian sums make the batching irrelevant too
    quantize_model(batched, _spec(batch_size=1), IDS, progress=False)
    assert _digest(batched) == one
    got = _run_ranks(tmp_path)
    for r in got:
        assert r["digest"] == one
        assert r["loss"] == [rec.stats["loss"] for rec in records]
        assert r["tokens"] == [rec.tokens for rec in records] == [6 * 24] * 14  # every Hessian saw all samples
        assert "true_sequential=True needs every calibration sample in one forward" in r["true_sequential"]
    assert got[0]["wrote_log"] and not got[1]["wrote_log"]  # rank 0 alone writes files
    # 2 blocks of 4 Hessians (q/k/v, o, gate/up, down) and as many cross terms (asym_alpha, the default), two
    # float64 bins each
    bins = 2 * (3 * 64 * 64 + 160 * 160) * 2 * 8 * 2
    assert bins < sum(r["sent"] for r in got) < 1.2 * bins  # plus row levels and the solutions


def test_a_failing_rank_stops_every_rank_with_its_message(tmp_path):
    got = _run_ranks(tmp_path, fail_rank=1)
    assert got[1]["error"].endswith("out of memory in block 1")
    assert got[0]["error"] == "RuntimeError: rank 1 failed: ValueError: out of memory in block 1"
    assert not got[0]["wrote_log"]


def _crashing_worker(rank: int, world: int, folder: str, _unused: int) -> None:
    """Two ranks quantize with a run folder (rank 0 writes it) and both crash as block 1 starts."""
    import torch.distributed as dist

    from hf_babai.engine import BlockStore, quantize_model, run_identity

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    model = _model()
    store = BlockStore(f"{folder}/run", run_identity(model, _spec(), IDS, 2), resume=False) if rank == 0 else None

    def crash(*_):
        raise ValueError("crash")

    model.model.layers[1].register_forward_pre_hook(crash)
    with contextlib.suppress(ValueError):  # the crash, on both ranks (rank 1's, or "rank 1 failed")
        quantize_model(model, _spec(), IDS, progress=False, store=store)
    dist.destroy_process_group()


def test_a_distributed_run_resumes_in_one_process(tmp_path):
    """Block 0 finished on two ranks, then both crashed: one process resumes from rank 0's run folder and gets the
    model an uninterrupted single-process run gets (the result does not depend on the number of ranks)."""
    from hf_babai.engine import BlockStore, quantize_model, run_identity

    torch.set_num_threads(1)
    mp.spawn(_crashing_worker, args=(2, str(tmp_path), -1), nprocs=2, join=True)
    assert sorted(p.name for p in (tmp_path / "run" / "blocks").iterdir())[0] == "block-00000.json"
    model = _model()
    store = BlockStore(tmp_path / "run", run_identity(model, _spec(), IDS, 2), resume=True)
    assert store.finished == 1
    quantize_model(model, _spec(), IDS, progress=False, store=store)
    reference = _model()
    quantize_model(reference, _spec(), IDS, progress=False)
    assert _digest(model) == _digest(reference)


def test_owners_balance_solve_cost_deterministically():
    from hf_babai.engine.distributed import owners, solve_cost

    costs = [solve_cost(4096, [4096] * 3), solve_cost(4096, [4096]), solve_cost(4096, [11008] * 2)]
    costs.append(solve_cost(11008, [4096]))
    assert owners(costs, 2) == [1, 0, 0, 1]  # gate/up (the most weights) alone; q/k/v with down_proj; o to rank 1
    assert owners(costs, 1) == [0, 0, 0, 0]
    assert owners(costs, 4) == [1, 3, 0, 2]
    assert owners([1.0, 1.0, 1.0, 1.0], 3) == [0, 1, 2, 0]


def test_cli_nproc_2_writes_the_single_process_checkpoint(tiny_env, tmp_path):
    """``hf-babai quantize --nproc 2`` (torchrun, gloo) and one process with the two-pass schedule write the same
    bytes; a bad --nproc is refused before anything loads."""
    cli = [sys.executable, "-m", "hf_babai", "quantize", str(tiny_env["src"]), "--quiet", "--bits", "4"]
    data = ["--group-size", "32", "--nsamples", "6", "--seqlen", "32"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    one = subprocess.run(
        [*cli, *data, "--out", str(tmp_path / "one"), "--no-true-sequential", "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, child_error(one)
    two = subprocess.run(
        [*cli, *data, "--out", str(tmp_path / "two"), "--nproc", "2"], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, child_error(two)
    for name in ("model.safetensors", "config.json"):  # the config records the two-pass schedule both ran
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert two.stdout.count("quantized 14 layers") == 1  # rank 0 alone reports
    bad = subprocess.run([*cli, "--out", str(tmp_path / "x"), "--nproc", "0"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "--nproc must be >= 1" in bad.stderr and not (tmp_path / "x").exists()


def test_four_ranks_with_uneven_shares(tmp_path):
    """6 samples over 4 ranks (1, 2, 1, 2 each) and the same 6 in one process: one model."""
    from hf_babai.engine import quantize_model

    torch.set_num_threads(1)
    model = _model()
    quantize_model(model, _spec(), IDS, progress=False)
    got = _run_ranks(tmp_path, world=4)
    assert all(r["digest"] == _digest(model) for r in got)


def _asym_worker(rank: int, world: int, folder: str, _unused: int) -> None:
    import torch.distributed as dist

    from hf_babai.engine import quantize_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        model = _model()
        quantize_model(model, _spec(asym_alpha=0.25), IDS, progress=False)
        (Path(folder) / f"rank-{rank}.json").write_text(json.dumps({"digest": _digest(model)}))
    finally:
        dist.destroy_process_group()


def test_asymmetric_calibration_on_two_ranks_gives_the_single_process_model(tmp_path):
    """``asym_alpha``: each rank carries the float stream of its own samples and the cross terms are exact sums
    reduced with the Hessians, so two ranks (and one sample per forward) give the single process's model, which
    differs from the plain run's."""
    from hf_babai.engine import quantize_model

    torch.set_num_threads(1)
    model, batched, plain = _model(), _model(), _model()
    quantize_model(model, _spec(asym_alpha=0.25), IDS, progress=False)
    quantize_model(batched, _spec(asym_alpha=0.25, batch_size=1), IDS, progress=False)
    quantize_model(plain, _spec(asym_alpha=0.0), IDS, progress=False)
    assert _digest(batched) == _digest(model) != _digest(plain)
    mp.spawn(_asym_worker, args=(2, str(tmp_path), -1), nprocs=2, join=True)
    assert all(json.loads((tmp_path / f"rank-{r}.json").read_text())["digest"] == _digest(model) for r in range(2))


def _moe():
    from integration_tests.architectures import _tiny_model

    torch.manual_seed(0)
    return _tiny_model("qwen3_moe", {}, IDS).eval()  # 2 MoE blocks, fused experts unfused one Linear each


def _moe_worker(rank: int, world: int, folder: str, _unused: int) -> None:
    import torch.distributed as dist

    from hf_babai.engine import quantize_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        model = _moe()
        records = quantize_model(model, _spec(batch_size=1), IDS, progress=False)
        out = {"digest": _digest(model), "tokens": {r.name: r.tokens for r in records}}
        (Path(folder) / f"rank-{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_moe_experts_on_two_ranks_give_the_single_process_model(tmp_path):
    """A mixture-of-experts model (every expert its own Hessian, spread over the ranks by solve cost): with one
    sample per forward, each rank's batches are the single process's batches, so the model is the same byte for
    byte, and each expert's Hessian counts the tokens routed to it from both ranks' samples."""
    from hf_babai.engine import quantize_model

    torch.set_num_threads(1)
    model = _moe()
    records = quantize_model(model, _spec(batch_size=1), IDS, progress=False)
    experts = {r.name: r.tokens for r in records if ".experts." in r.name}
    assert len(experts) > 8 and len(set(experts.values())) > 1  # experts see different numbers of tokens
    mp.spawn(_moe_worker, args=(2, str(tmp_path), -1), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    for r in got:
        assert r["digest"] == _digest(model)
        assert r["tokens"] == {rec.name: rec.tokens for rec in records}
