"""mixtral.parallel on CPU with gloo, in real processes: each rank's outputs equal the single-process model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


def _run_ranks(tmp_path, folder, world: int, inputs: dict, mode: str) -> list[dict]:
    torch.save(inputs, tmp_path / "inputs.pt")
    procs = []
    for rank in range(world):
        spec = {"folder": str(folder), "init": str(tmp_path / "rendezvous"), "rank": rank, "world": world,
                "inputs": str(tmp_path / "inputs.pt"), "out": str(tmp_path / f"out{rank}.pt"), "mode": mode}
        procs.append(subprocess.Popen([sys.executable, WORKER, json.dumps(spec)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{log[-3000:]}"
    return [torch.load(tmp_path / f"out{rank}.pt", weights_only=True) for rank in range(world)]


@pytest.mark.parametrize("mode,world,window", [("tp", 2, None), ("tp", 4, 5), ("ep", 2, 5), ("ep", 4, None)],
                         ids=["tp2", "tp4-kv-replicated-window5", "ep2-window5", "ep4"])
def test_parallel_equals_one_process(tmp_path, mode, world, window):
    """Padded batch, logits and greedy generate() (static cache, past the window): every rank equals one process.
    TP at 4 ranks: fewer kv heads (2) than ranks, each rank keeps the kv head its query heads read. EP at 4 ranks:
    one expert each; decoding 2 rows gives the last ranks no tokens to dispatch and some experts no pairs."""
    folder = tmp_path / "ckpt"
    model = _checkpoint(folder, window)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        ref_logits = model(ids, attention_mask=mask).logits
    ref_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    outs = _run_ranks(tmp_path, folder, world, {"ids": ids, "mask": mask}, mode)
    full = sum(p.numel() for p in model.parameters())
    for rank, out in enumerate(outs):
        real = mask.bool()
        assert (out["logits"] - ref_logits)[real].abs().max() <= 1e-5, f"rank {rank}"
        assert torch.equal(out["tokens"], ref_tokens), f"rank {rank}"
        assert out["parameters"] < full  # each rank holds a slice of attention and experts
    assert all(o["parameters"] == outs[0]["parameters"] for o in outs)
    if mode == "ep" and world == 4:
        assert any(o["idle"] > 0 for o in outs)  # the path where a rank's experts get nothing ran


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


@pytest.mark.parametrize("flag", ["--tp", "--ep"])
def test_torchrun_generate_prints_what_one_process_does(tiny_sp_folder, flag):
    args = ["generate", "The capital of France is", "--model", tiny_sp_folder, "--max-new-tokens", "12",
            "--no-stream"]
    alone = _mixtral(args)
    assert alone.returncode == 0, alone.stderr
    ranks = _mixtral(args + [flag, "2"], nproc=2)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout == alone.stdout and alone.stdout.strip()  # rank 0 prints, once
    kind = {"--tp": "tensor", "--ep": "expert"}[flag]
    assert ranks.stderr.count(f"{kind} parallel over 2 ranks") == 1


def test_torchrun_misuse_is_a_clear_error(tiny_sp_folder):
    args = ["generate", "Hi", "--model", tiny_sp_folder, "--max-new-tokens", "2"]
    alone = _mixtral(args + ["--tp", "2"])
    assert alone.returncode == 1 and "torchrun --nproc-per-node 2 -m mixtral" in alone.stderr
    ranks = _mixtral(args + ["--tp", "4"], nproc=2)
    assert ranks.returncode != 0 and "--tp 4 needs 4 processes, torchrun started 2" in ranks.stderr
    both = _mixtral(args + ["--tp", "2", "--ep", "2"])
    assert both.returncode == 1 and "not supported yet" in both.stderr
