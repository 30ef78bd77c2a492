"""Fine-tuning step speed and peak memory: ours against Transformers + PEFT, same weights, targets, data and batch.

    python benchmarks/finetune.py [--layers 2] [--batch 2] [--seq 128] [--steps 3] [--qlora]

The model is the bench config (hidden 1024, 8 experts of intermediate 3584, vocab 32000) cut to --layers layers,
random fp32 weights written once by Transformers and loaded by both. Three modes:
- lora-attention: LoRA r=16 on q/k/v/o_proj;
- lora-experts: LoRA r=16 on q/k/v/o_proj, the router and every expert's gate_up_proj and down_proj (PEFT:
  target_parameters, which adds W + BA for every expert on every forward; ours adds x A_e^T B_e^T for each expert's
  routed tokens only);
- full: every parameter, AdamW.
A step is forward + backward + fused AdamW on a (batch, seq) batch of random tokens (labels = inputs, no aux loss);
tokens/s is the median over --steps after one warm-up step. Each (engine, mode) runs in its own process so that
its peak RSS (ru_maxrss, less the RSS before the model was built) is its own. Writes benchmarks/out/finetune.json.

--qlora adds ours alone with LoRA on every target over an int8 and an int4 base (quantized as loaded; the float
model never whole), and checks QLoRA's memory formula on this shape: peak = weights (the bytes of every parameter
and buffer) + 16 bytes a trainable parameter (fp32 value, gradient, AdamW's two moments) + a fixed part (transients:
a dequantized expert, library buffers) + activations a token. Each scheme runs at --seq and 2 x --seq tokens, with
and without gradient checkpointing: the activations a token are the slope between the two. For Mixtral-8x7B it
prints the weights and LoRA state of a meta-device model of its config, and the activations a token scaled from
this shape: the output layer's part (12 bytes a vocabulary entry: logits, log-softmax, gradient; the same vocab)
as is, the rest x 4 (hidden and intermediate sizes) x 32 / --layers (layers).
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
QLORA_MODES = ("qlora-int8", "qlora-int4")
RANK = 16
MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)


def qlora_bytes(model) -> tuple[int, int]:
    """(bytes of the weights as held, bytes of the trainable state: fp32 value, grad, 2 AdamW moments)."""
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return weights, 16 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def mixtral_8x7b_qlora(scheme: str) -> dict:
    """The formula's terms for Mixtral-8x7B with LoRA r=16 on every target over a `scheme` base (no activations)."""
    import torch

    import mixtral
    from mixtral.lora import LoraConfig, apply_lora
    from mixtral.quantize import quantize

    with torch.device("meta"):
        model = mixtral.MixtralForCausalLM(mixtral.MixtralConfig(**MIXTRAL_8X7B, dtype="bfloat16")).to(torch.bfloat16)
    quantize(model, scheme, progress=False)
    apply_lora(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["all"]))
    weights, state = qlora_bytes(model)
    return {"scheme": scheme, "weights_bytes": weights, "trainable_state_bytes": state,
            "trainable": state // 16}


def worker(engine: str, mode: str, folder: str, batch: int, seq: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(C.THREADS)
    base_rss = C.rss_bytes()
    torch.manual_seed(0)
    if engine == "ours":
        import mixtral
        from mixtral.lora import LoraConfig, apply_lora

        scheme = mode.split("-")[1].split("+")[0] if mode.startswith("qlora") else None
        model = mixtral.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32, progress=False,
                                                           quantization=scheme)
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
    if mode.endswith("+ckpt"):
        model.gradient_checkpointing_enable()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=True)  # both trainers' default (Transformers' since torch 2.8)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, output_router_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    weights, state = qlora_bytes(model)
    return {"engine": engine, "mode": mode, "tokens_per_s": batch * seq / statistics.median(times[1:]),
            "step_s": times[1:], "peak_bytes": C.peak_rss_bytes() - base_rss, "loss": float(loss),
            "trainable": sum(p.numel() for p in trainable), "weights_bytes": weights, "trainable_state_bytes": state}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--qlora", action="store_true", help="also LoRA over int8 / int4 bases (ours) and the memory "
                    "formula checked, with its Mixtral-8x7B figure")
    ap.add_argument("--modes", default=None, help=f"comma-separated subset of {', '.join(MODES + QLORA_MODES)}")
    ap.add_argument("--worker", nargs=3, metavar=("ENGINE", "MODE", "FOLDER"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker, a.batch, a.seq, a.steps)))
        return
    import torch
    import transformers

    modes = a.modes.split(",") if a.modes else list(MODES) + (list(QLORA_MODES) if a.qlora else [])
    runs = [(mode, engine, a.seq) for mode in modes for engine in ("ours", "transformers+peft")
            if engine == "ours" or mode in MODES]
    runs = [run for mode, engine, seq in runs for run in (
        [(mode + ckpt, engine, n) for ckpt in ("", "+ckpt") for n in (seq, 2 * seq)] if mode in QLORA_MODES
        else [(mode, engine, seq)])]
    with tempfile.TemporaryDirectory(prefix="mixtral-finetune-bench-") as folder:
        torch.manual_seed(C.SEED)
        config = transformers.MixtralConfig(**{**C.BENCH_CONFIG, "num_hidden_layers": a.layers})
        transformers.MixtralForCausalLM(config).save_pretrained(folder)
        results = []
        for mode, engine, seq in runs:
            out = subprocess.run([sys.executable, __file__, "--worker", engine, mode, folder, "--batch",
                                  str(a.batch), "--seq", str(seq), "--steps", str(a.steps)],
                                 capture_output=True, text=True, env=C.worker_env(), timeout=3600)
            if out.returncode:
                raise RuntimeError(f"{engine} {mode} failed:\n{out.stderr[-3000:]}")
            results.append({**json.loads(out.stdout.strip().splitlines()[-1]), "seq": seq})
            r = results[-1]
            print(f"{engine:18s} {mode:15s} seq {seq:4d} {r['tokens_per_s']:7.1f} tok/s  peak "
                  f"{r['peak_bytes'] / C.GB:5.2f} GB", flush=True)
    by = {(r["engine"], r["mode"], r["seq"]): r for r in results}
    rows = []
    for mode in (m for m in MODES if m in modes):
        o, t = by["ours", mode, a.seq], by["transformers+peft", mode, a.seq]
        rows.append([mode, f"{o['trainable'] / 1e6:.1f}M", C.fmt(o["tokens_per_s"]), C.fmt(t["tokens_per_s"]),
                     C.fmt(o["tokens_per_s"] / t["tokens_per_s"], 2), C.fmt(o["peak_bytes"] / C.GB, 2),
                     C.fmt(t["peak_bytes"] / C.GB, 2), C.fmt(o["peak_bytes"] / t["peak_bytes"], 2)])
    print()
    if rows:
        print(C.format_table(["mode", "trainable", "ours tok/s", "HF+PEFT tok/s", "speed ratio", "ours peak GB",
                              "HF+PEFT peak GB", "memory ratio"], rows))
    big, qrows = [], []
    logits_part = 12 * C.BENCH_CONFIG["vocab_size"]  # bytes a token: fp32 logits, log-softmax, their gradient
    scale = MIXTRAL_8X7B["hidden_size"] / C.BENCH_CONFIG["hidden_size"] * MIXTRAL_8X7B["num_hidden_layers"] / a.layers
    for mode in (m for m in QLORA_MODES if m in modes):
        m = mixtral_8x7b_qlora(mode.split("-")[1])
        for ckpt in ("", "+ckpt"):
            short, long = by["ours", mode + ckpt, a.seq], by["ours", mode + ckpt, 2 * a.seq]
            per_token = (long["peak_bytes"] - short["peak_bytes"]) / (a.batch * a.seq)
            fixed = long["peak_bytes"] - long["weights_bytes"] - long["trainable_state_bytes"] \
                - per_token * a.batch * 2 * a.seq
            big_per_token = logits_part + max(0.0, per_token - logits_part) * scale
            m["activations_per_token_bytes" + ckpt.replace("+", "_")] = big_per_token
            qrows.append([mode + ckpt, C.fmt(long["tokens_per_s"]), C.fmt(long["weights_bytes"] / C.GB, 3),
                          C.fmt(long["trainable_state_bytes"] / C.GB, 3), C.fmt(fixed / C.GB, 3),
                          C.fmt(per_token / 1e6, 2), C.fmt(long["peak_bytes"] / C.GB, 3),
                          C.fmt(m["weights_bytes"] / C.GB, 1), C.fmt(m["trainable_state_bytes"] / C.GB, 2),
                          C.fmt(big_per_token * 1000 / C.GB, 1)])
        big.append(m)
    if qrows:
        print(C.format_table(["mode", f"tok/s ({2 * a.seq})", "weights GB", "LoRA state GB", "fixed GB",
                              "MB a token", f"peak GB ({2 * a.seq})", "8x7B weights GB", "8x7B LoRA state GB",
                              "8x7B GB / 1k tokens"], qrows))
    print(f"bench config with {a.layers} layers, fp32, batch {a.batch} x {a.seq} tokens, {C.THREADS} threads")
    C.write_json(os.path.join(C.OUT_DIR, "finetune.json"), {"results": results, "layers": a.layers, "batch": a.batch,
                                                          "seq": a.seq, "steps": a.steps, "mixtral_8x7b": big,
                                                          "time": time.time()})


if __name__ == "__main__":
    main()
