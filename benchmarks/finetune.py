"""Fine-tuning step speed and peak memory: ours against Transformers + PEFT, same weights, targets, data and batch.

    python benchmarks/finetune.py [--layers 2] [--batch 2] [--seq 128] [--steps 3]

The model is the bench config (hidden 1024, 8 experts of intermediate 3584, vocab 32000) cut to --layers layers,
random fp32 weights written once by Transformers and loaded by both. Three modes:
- lora-attention: LoRA r=16 on q/k/v/o_proj;
- lora-experts: LoRA r=16 on q/k/v/o_proj, the router and every expert's gate_up_proj and down_proj (PEFT:
  target_parameters, which adds W + BA for every expert on every forward; ours adds x A_e^T B_e^T for each expert's
  routed tokens only);
- full: every parameter, AdamW.
A step is forward + backward + AdamW on a (batch, seq) batch of random tokens (labels = inputs, no aux loss);
tokens/s is the median over --steps after one warm-up step. Each (engine, mode) runs in its own process so that
its peak RSS (ru_maxrss, less the RSS before the model was built) is its own. Writes benchmarks/out/finetune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common as C

MODES = ("lora-attention", "lora-experts", "full")
RANK = 16


def worker(engine: str, mode: str, folder: str, batch: int, seq: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(C.THREADS)
    base_rss = C.rss_bytes()
    torch.manual_seed(0)
    if engine == "ours":
        import mixtral
        from mixtral.lora import LoraConfig, apply_lora

        model = mixtral.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32, progress=False)
        if mode != "full":
            targets = ["attention"] if mode == "lora-attention" else ["all"]
            apply_lora(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets))
    else:
        import peft
        import transformers

        model = transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                experts_implementation="eager")
        if mode != "full":
            params = None if mode == "lora-attention" else ["mlp.gate.weight", "mlp.experts.gate_up_proj",
                                                            "mlp.experts.down_proj"]
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                target_parameters=params))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, output_router_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"engine": engine, "mode": mode, "tokens_per_s": batch * seq / statistics.median(times[1:]),
            "step_s": times[1:], "peak_bytes": C.peak_rss_bytes() - base_rss, "loss": float(loss),
            "trainable": sum(p.numel() for p in trainable)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", nargs=3, metavar=("ENGINE", "MODE", "FOLDER"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker, a.batch, a.seq, a.steps)))
        return
    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="mixtral-finetune-bench-") as folder:
        torch.manual_seed(C.SEED)
        config = transformers.MixtralConfig(**{**C.BENCH_CONFIG, "num_hidden_layers": a.layers})
        transformers.MixtralForCausalLM(config).save_pretrained(folder)
        results = []
        for mode in MODES:
            for engine in ("ours", "transformers+peft"):
                out = subprocess.run([sys.executable, __file__, "--worker", engine, mode, folder, "--batch",
                                      str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps)],
                                     capture_output=True, text=True, env=C.worker_env(), timeout=3600)
                if out.returncode:
                    raise RuntimeError(f"{engine} {mode} failed:\n{out.stderr[-3000:]}")
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = results[-1]
                print(f"{engine:18s} {mode:15s} {r['tokens_per_s']:7.1f} tok/s  peak {r['peak_bytes'] / C.GB:5.2f} GB",
                      flush=True)
    by = {(r["engine"], r["mode"]): r for r in results}
    rows = []
    for mode in MODES:
        o, t = by["ours", mode], by["transformers+peft", mode]
        rows.append([mode, f"{o['trainable'] / 1e6:.1f}M", C.fmt(o["tokens_per_s"]), C.fmt(t["tokens_per_s"]),
                     C.fmt(o["tokens_per_s"] / t["tokens_per_s"], 2), C.fmt(o["peak_bytes"] / C.GB, 2),
                     C.fmt(t["peak_bytes"] / C.GB, 2), C.fmt(o["peak_bytes"] / t["peak_bytes"], 2)])
    print()
    print(C.format_table(["mode", "trainable", "ours tok/s", "HF+PEFT tok/s", "speed ratio", "ours peak GB",
                          "HF+PEFT peak GB", "memory ratio"], rows))
    print(f"bench config with {a.layers} layers, fp32, batch {a.batch} x {a.seq} tokens, {C.THREADS} threads")
    C.write_json(os.path.join(C.OUT_DIR, "finetune.json"), {"results": results, "layers": a.layers, "batch": a.batch,
                                                          "seq": a.seq, "steps": a.steps, "time": time.time()})


if __name__ == "__main__":
    main()
