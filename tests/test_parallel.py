"""mixtral.parallel on CPU with gloo, in real processes: each rank's outputs equal the single-process model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from mixtral import MixtralConfig, MixtralForCausalLM
from mixtral.parallel.tensor import check_tensor_parallel

WORKER = os.path.join(os.path.dirname(__file__), "parallel_worker.py")
TIMEOUT = 240  # seconds for a whole group of ranks


def _checkpoint(path, window: int | None) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, sliding_window=window)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked logits: greedy choices are not near-ties
    model.save_pretrained(path)
    return model


def _run_ranks(tmp_path, folder, tp: int, ep: int, inputs: dict | None = None, sharded: bool = False,
               **extra) -> list[tuple[int, dict]]:
    """Start tp x ep worker processes; (exit code, what each saved) per rank."""
    world = tp * ep
    if inputs is not None:
        torch.save(inputs, tmp_path / "inputs.pt")
    procs = []
    for rank in range(world):
        spec = {"folder": str(folder), "init": str(tmp_path / "rendezvous"), "rank": rank, "world": world,
                "inputs": str(tmp_path / "inputs.pt") if inputs is not None else None,
                "out": str(tmp_path / f"out{rank}.pt"), "tp": tp, "ep": ep, "sharded": sharded, **extra}
        procs.append(subprocess.Popen([sys.executable, WORKER, json.dumps(spec)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    failing = extra.get("fail", {}).get("rank")  # a stopped rank never ends: wait for the others, then kill it
    printed: dict[int, str] = {}
    try:
        for rank, p in enumerate(procs):
            if rank != failing:
                printed[rank] = p.communicate(timeout=TIMEOUT)[0]
    finally:
        for p in procs:
            p.kill()
    if failing is not None:
        printed[failing] = procs[failing].communicate()[0]
    results = []
    for rank, p in enumerate(procs):
        log = printed[rank]
        path = tmp_path / f"out{rank}.pt"
        results.append((p.returncode, torch.load(path, weights_only=True) if path.exists() else {"log": log}))
        if not extra.get("fail"):
            assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{log[-3000:]}"
    return results


@pytest.mark.parametrize("tp,ep,window,sharded", [(2, 1, None, False), (4, 1, 5, True), (1, 2, 5, False),
                                                  (1, 4, None, True), (2, 2, 5, True)],
                         ids=["tp2", "tp4-kv-replicated-window5-sharded-load", "ep2-window5", "ep4-sharded-load",
                              "tp2xep2-window5-sharded-load"])
def test_parallel_equals_one_process(tmp_path, tp, ep, window, sharded):
    """Padded batch, logits and greedy generate() (static cache, past the window): every rank equals one process,
    whether it sharded the whole model or read only its slices (from_pretrained(tp=, ep=)). TP at 4 ranks: fewer
    kv heads (2) than ranks, each rank keeps the kv head its query heads read. EP at 4 ranks: one expert each;
    decoding 2 rows gives the last ranks no tokens to dispatch and some experts no pairs. TP x EP: a 2 x 2 mesh."""
    folder = tmp_path / "ckpt"
    model = _checkpoint(folder, window)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        ref_logits = model(ids, attention_mask=mask).logits
    ref_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    outs = [out for _, out in _run_ranks(tmp_path, folder, tp, ep, {"ids": ids, "mask": mask}, sharded)]
    full = sum(p.numel() for p in model.parameters())
    for rank, out in enumerate(outs):
        real = mask.bool()
        assert (out["logits"] - ref_logits)[real].abs().max() <= 1e-5, f"rank {rank}"
        assert torch.equal(out["tokens"], ref_tokens), f"rank {rank}"
        assert out["parameters"] < full  # each rank holds a slice of attention and experts
    assert all(o["parameters"] == outs[0]["parameters"] for o in outs)
    if ep == 4:
        assert any(o["idle"] > 0 for o in outs)  # the path where a rank's experts get nothing ran


@pytest.mark.parametrize("fmt,tp,ep", [("mistral", 2, 1), ("gguf", 2, 1), ("gguf", 1, 2)],
                         ids=["mistral-tp2", "gguf-tp2", "gguf-ep2"])
def test_sharded_loading_of_other_formats(tmp_path, fmt, tp, ep):
    """from_pretrained(tp=, ep=) of Mistral's consolidated format and of GGUF (q/k rows permuted on the way in,
    stacked GGUF experts): each rank's share gives the single-process outputs."""
    from mixtral.checkpoint.gguf import save_gguf
    from mixtral.checkpoint.mistral import save_mistral_checkpoint

    model = _checkpoint(tmp_path / "hub", None)
    path = tmp_path / ("m.gguf" if fmt == "gguf" else "mistral")
    if fmt == "gguf":
        save_gguf(model, path, dtype="f32", progress=False)
    else:
        save_mistral_checkpoint(model, path)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref_logits = model(ids).logits
    ref_tokens = model.generate(ids, max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    for _, out in _run_ranks(tmp_path, path, tp, ep, {"ids": ids, "mask": mask}, sharded=True):
        assert (out["logits"] - ref_logits).abs().max() <= 1e-5
        assert torch.equal(out["tokens"], ref_tokens)


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)], ids=["tp2", "ep2"])
def test_quantized_shares(tmp_path, tp, ep):
    """from_pretrained(tp=, ep=, quantization="int8"): each rank quantizes its float share. EP keeps whole experts,
    so it equals one int8 process; TP's o_proj and down_proj rows are split, so each rank's per-row scales cover
    its half of a row: as close to the float model as one int8 process is, and the ranks agree."""
    from mixtral.quantize import quantize

    model = _checkpoint(tmp_path / "ckpt", None)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
        int8 = quantize(model, "int8", progress=False)(ids).logits
    outs = [out for _, out in _run_ranks(tmp_path, tmp_path / "ckpt", tp, ep, {"ids": ids, "mask": torch.ones_like(
        ids)}, sharded=True, quantize="int8")]
    for out in outs:
        if ep > 1:
            assert (out["logits"] - int8).abs().max() <= 1e-5
        else:
            assert 0 < (out["logits"] - ref).abs().max() <= 2 * (int8 - ref).abs().max()
        assert torch.equal(out["tokens"], outs[0]["tokens"])


def test_sharded_loading_needs_ranks(tiny_sp_folder):
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node 2"):
        MixtralForCausalLM.from_pretrained(tiny_sp_folder, tp=2, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)], ids=["tp2", "ep2"])
def test_nccl_equals_one_process(tmp_path, tp, ep):
    """The same equality on GPUs with NCCL, a GPU a rank, loading sharded, against one process on a GPU (fp32;
    torch runs fp32 GEMMs without TF32 unless told to)."""
    folder = tmp_path / "ckpt"
    model = _checkpoint(folder, 5).to("cuda:0")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        ref_logits = model(ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
    ref_tokens = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=10, pad_token_id=0,
                                eos_token_id=None).cpu()
    for _, out in _run_ranks(tmp_path, folder, tp, ep, {"ids": ids, "mask": mask}, sharded=True, backend="nccl"):
        assert (out["logits"] - ref_logits)[mask.bool()].abs().max() <= 1e-5
        assert torch.equal(out["tokens"], ref_tokens)


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)], ids=["tp2", "ep2"])
def test_sharded_loading_reads_only_the_share(tmp_path, tp, ep):
    """from_pretrained(tp=, ep=) on a sharded checkpoint: each rank's weights are its share (replicated embeddings,
    norms and router; half of the experts, and for TP half of attention), its peak memory while loading about that share, where
    loading the whole model and then sharding it peaks at the whole model (measured in the same process)."""
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=256, hidden_size=256, intermediate_size=2048, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8)
    model = MixtralForCausalLM(config)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="8MB")
    total = sum(p.numel() * 4 for p in model.parameters())
    split = sum(p.numel() * 4 for n, p in model.named_parameters()  # TP: attention and experts; EP: experts
                if "experts" in n or ("self_attn" in n and tp > 1))
    share = total - split + split // 2
    del model
    for _, out in _run_ranks(tmp_path, tmp_path / "ckpt", tp, ep, sharded=True, control=True):
        assert out["equal"]  # the same share as sharding the whole model
        assert out["weight_bytes"] == share
        assert out["load_peak"] < 1.15 * share, (out["load_peak"], share)
        assert out["control_peak"] > 0.95 * total, (out["control_peak"], total)


@pytest.mark.parametrize("how", ["die", "hang"])
def test_a_failed_rank_is_named_by_the_others(tmp_path, how):
    """3 tensor-parallel ranks; rank 2 exits (or stops, SIGSTOP) mid-generate(): ranks 0 and 1 raise RankFailure
    naming rank 2, within the collective timeout (5 s) plus the check-in wait (3 s), rather than hang."""
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=3, num_local_experts=2)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    os.environ["MIXTRAL_DIST_CHECK_IN"] = "3"
    try:
        start = time.monotonic()
        results = _run_ranks(tmp_path, tmp_path / "ckpt", 3, 1, timeout=5, fail={"rank": 2, "how": how})
    finally:
        del os.environ["MIXTRAL_DIST_CHECK_IN"]
    assert time.monotonic() - start < 60
    for rank in (0, 1):
        code, out = results[rank]
        assert code == 17, (rank, code, out)
        assert out["ranks"] == [2] and "rank 2 of 3 died or stopped responding" in out["error"], out["error"]
    assert results[2][0] != 0


def test_bad_splits_fail_before_loading():
    config = MixtralConfig(num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336)
    check_tensor_parallel(config, 8)
    check_tensor_parallel(config, 16)  # 8 kv heads, 16 ranks: two ranks share each kv head
    with pytest.raises(ValueError, match="num_attention_heads \\(32\\) divisible by 3"):
        check_tensor_parallel(config, 3)
    with pytest.raises(ValueError, match="num_key_value_heads \\(8\\)"):
        check_tensor_parallel(MixtralConfig(hidden_size=3072, num_attention_heads=24, num_key_value_heads=8), 12)
    with pytest.raises(ValueError, match="intermediate_size \\(1000\\) divisible by 16"):
        check_tensor_parallel(MixtralConfig(num_attention_heads=32, num_key_value_heads=8, intermediate_size=1000), 16)


def test_needs_an_initialized_process_group():
    model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=16,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             num_local_experts=2))
    from mixtral.parallel import tensor_parallel

    with pytest.raises(RuntimeError, match="torch.distributed initialized"):
        tensor_parallel(model)


def _mixtral(args: list[str], nproc: int | None = None) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
                 "mixtral"] if nproc else [sys.executable, "-m", "mixtral"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIXTRAL_DIST_TIMEOUT": "60"}
    return subprocess.run(launcher + args, capture_output=True, text=True, timeout=TIMEOUT, env=env)


@pytest.mark.parametrize("flags", [["--tp", "2"], ["--ep", "2"], ["--tp", "2", "--ep", "2"]],
                         ids=["tp2", "ep2", "tp2xep2"])
def test_torchrun_generate_prints_what_one_process_does(tiny_sp_folder, flags):
    args = ["generate", "The capital of France is", "--model", tiny_sp_folder, "--max-new-tokens", "12",
            "--no-stream"]
    alone = _mixtral(args)
    assert alone.returncode == 0, alone.stderr
    ranks = _mixtral(args + flags, nproc=2 * (len(flags) // 2))
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout == alone.stdout and alone.stdout.strip()  # rank 0 prints, once
    kinds = " x ".join(f"{kind} parallel over 2 ranks" for kind, flag in (("tensor", "--tp"), ("expert", "--ep"))
                       if flag in flags)
    assert ranks.stderr.count(kinds + ":") == 1


def test_torchrun_misuse_is_a_clear_error(tiny_sp_folder):
    args = ["generate", "Hi", "--model", tiny_sp_folder, "--max-new-tokens", "2"]
    alone = _mixtral(args + ["--tp", "2"])
    assert alone.returncode == 1 and "torchrun --nproc-per-node 2 -m mixtral" in alone.stderr
    ranks = _mixtral(args + ["--tp", "4"], nproc=2)
    assert ranks.returncode != 0 and "--tp 4 needs 4 processes, torchrun started 2" in ranks.stderr
    serve = _mixtral(["serve", "--model", tiny_sp_folder, "--ep", "2"])
    assert serve.returncode == 1 and "torchrun --nproc-per-node 2 -m mixtral" in serve.stderr
    both = _mixtral(args + ["--tp", "2", "--ep", "2"], nproc=2)
    assert both.returncode != 0 and "--tp 2 --ep 2 needs 4 processes, torchrun started 2" in both.stderr
