"""The `mixtral` command: generate | chat | serve | info | convert. Text goes to stdout, everything else to stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

SAMPLING_DEFAULT_NOTE = "greedy unless --do-sample (as in Transformers)"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="checkpoint folder or .gguf file (default: the built-in demo model, built on first use)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu (default), cuda, ...")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantization while loading (attention and expert weights, and an untied LM "
                        "head in int8)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory the weights may take (say 18GiB); the experts that do not fit stay in "
                        "--offload-folder and are read when routed to")
    p.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="where offloaded experts are laid out (once; reused while the checkpoint is unchanged)")
    p.add_argument("--lora", default=None, metavar="DIR",
                   help="a LoRA adapter in PEFT's format (ours or PEFT's) to run with: merged into float weights, "
                        "kept beside quantized ones")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help=f"sample instead of greedy; {SAMPLING_DEFAULT_NOTE}")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile: faster decoding after a one-off compile "
                        "(minutes on 2 cores the first time: 2.5 min for the demo's 30 layers; seconds from "
                        "inductor's cache after), so it pays off on long generations")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor parallel over N ranks (under torchrun: "
                   "--nproc-per-node tp x ep; gloo on CPU, NCCL on CUDA)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel over N ranks (with --tp: a 2-D mesh)")


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Only what the user set: the rest comes from the checkpoint's generation_config.json."""
    given = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample or None, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                 seed=args.seed, compile=args.compile or None)
    return {k: v for k, v in given.items() if v is not None}


def _load(args: argparse.Namespace):
    from .checkpoint.placement import offload_kwargs
    from .pipeline import load_model_and_tokenizer

    tp, ep = getattr(args, "tp", 1), getattr(args, "ep", 1)
    if tp < 1 or ep < 1:
        raise ValueError(f"--tp and --ep must be >= 1, got {tp} and {ep}")
    offload = offload_kwargs(args.max_memory, args.offload_folder, args.device)
    if tp == 1 and ep == 1:
        return load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                                        lora=args.lora, **offload)
    if offload:
        raise ValueError("--max-memory/--offload-folder and --tp/--ep do not go together")
    rank = start_ranks(args)
    # each rank reads only its slices; the sharding needs floating-point weights, so --quantize applies after it
    model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device, progress=rank == 0,
                                          quantize=args.quantize, tp=tp, ep=ep, lora=args.lora)
    from .parallel import launch

    if rank == 0:
        print(launch.describe(model, tp, ep), file=sys.stderr)
    args.rank, args.seed = rank, launch.shared_seed(args.seed) if args.do_sample else args.seed
    return model, tok


def start_ranks(args: argparse.Namespace) -> int:
    """Under torchrun: the process group, then the world size and the config's split checked before any weight
    is read. This process's rank."""
    from .auto import AutoConfig
    from .demo import demo_model_path
    from .parallel import launch

    rank, _ = launch.init_distributed(args.tp, args.ep, args.device)
    if args.model is None:  # the demo model is built on first use: by rank 0 alone, the others wait for it
        if rank == 0:
            demo_model_path()
        launch.barrier()
    launch.check_config(AutoConfig.from_pretrained(args.model or demo_model_path()), args.tp, args.ep)
    return rank


def _reply(model: Any, tok: Any, ids: list[int], args: argparse.Namespace, stream: bool) -> str:
    import torch

    from .generation import TextStreamer

    stream = stream and getattr(args, "rank", 0) == 0  # under torchrun, rank 0 speaks for all
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    input_ids = torch.tensor([ids], device=model.device)
    out = model.generate(input_ids, streamer=streamer, pad_token_id=tok.pad_token_id, **_generation_kwargs(args))
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def cmd_generate(args: argparse.Namespace) -> int:
    model, tok = _load(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        ids = tok.encode(args.prompt)
    text = _reply(model, tok, ids, args, stream=not args.no_stream)
    if args.no_stream and getattr(args, "rank", 0) == 0:
        print(text)
    stats = model.offload_stats()
    if args.verbose and stats is not None:
        print(f"offloaded experts: {stats['slots']} of {stats['experts']} resident; {stats['hits']} hits, "
              f"{stats['misses']} misses ({stats['hit_rate']:.1%} hits); {stats['prefetched']} read ahead "
              f"({stats['prefetch_accuracy']:.1%} then used); {stats['bytes_read'] / 2**20:,.1f} MiB read",
              file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model, tok = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the model. Empty line or /exit to quit, /reset to start over.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in ("", "/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        messages.append({"role": "assistant", "content": _reply(model, tok, ids, args, stream=True).strip()})
    return 0


def _folder_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _kernel_level() -> str:
    """The CPU kernels' instruction-set level in use (built on first use), and the levels this CPU runs."""
    from .kernels import cpu

    levels = cpu.supported_levels()
    level = cpu.isa()
    if level is None:
        return "off (MIXTRAL_KERNELS=0): torch ops" if os.environ.get("MIXTRAL_KERNELS") == "0" else "none: torch ops"
    return f"{level} (this CPU runs {', '.join(levels)}; MIXTRAL_ISA picks a lower one)"


def cmd_info(args: argparse.Namespace) -> int:
    from .config import MixtralConfig

    gguf_scheme = None
    if args.path.endswith(".gguf"):
        from .checkpoint.gguf import open_gguf

        config, source, _ = open_gguf(args.path, progress=False)
        gguf_scheme = source.nearest_scheme()
        if gguf_scheme:  # the output layer and embeddings as loading keeps them
            gguf_scheme.update(lm_head=source.stored_scheme("output.weight"),
                               embed_tokens=source.stored_scheme("token_embd.weight"))
    else:
        config = MixtralConfig.from_pretrained(args.path)
    c = config
    hd = c.head_size
    attn = c.hidden_size * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    expert = 3 * c.hidden_size * c.intermediate_size
    per_layer_fixed = attn + c.num_local_experts * c.hidden_size + 2 * c.hidden_size
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    total = c.num_hidden_layers * (per_layer_fixed + c.num_local_experts * expert) + embed + c.hidden_size
    active = c.num_hidden_layers * (per_layer_fixed + c.num_experts_per_tok * expert) + embed + c.hidden_size
    info = {
        "path": args.path, "layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
        "head_dim": hd, "experts": c.num_local_experts, "experts_per_token": c.num_experts_per_tok,
        "vocab_size": c.vocab_size, "context": c.max_position_embeddings, "sliding_window": c.sliding_window,
        "rope_theta": c.rope_theta, "dtype": c.dtype, "parameters_total": total, "parameters_active": active,
        "size_on_disk_bytes": _folder_size(args.path), "cpu_kernels": _kernel_level(),
    }
    if args.max_memory is not None:
        info["plan"] = _memory_plan(config, args, gguf_scheme)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            if k.startswith("parameters"):
                v = f"{v:,} ({v / 1e9:.3f} B)"
            elif k == "size_on_disk_bytes":
                k, v = "size_on_disk", f"{v / 2**20:,.1f} MiB"
            elif k == "plan":
                continue
            print(f"{k:>18}: {v}")
        p = info.get("plan")
        how = p and p["dtype"] + (f", {p['quantization']}" if p["quantization"] else "")
        if p and "error" in p:
            print(f"with --max-memory {args.max_memory} ({how}): it cannot load: {p['error']}")
        elif p:
            from .checkpoint.placement import human_size as size

            print(f"with --max-memory {args.max_memory} ({how}):\n"
                  f"  dense weights {size(p['dense_bytes'])} resident; experts {size(p['expert_bytes'])} each, "
                  f"{p['slots']} of {p['experts']} a layer resident ({size(p['resident_bytes'])} in all), "
                  f"{size(p['offloaded_bytes'])} in --offload-folder\n"
                  f"  read from disk per token at random routing: {size(p['read_per_token_bytes'])} (the KV cache "
                  "and activations come on top)")
    return 0


def _memory_plan(config: Any, args: argparse.Namespace, gguf_scheme: dict[str, Any] | None) -> dict[str, Any]:
    """What loading with --max-memory would keep where (mixtral.offload.plan_summary)."""
    import torch

    from .checkpoint.placement import parse_size
    from .checkpoint.source import CheckpointError
    from .config import parse_dtype
    from .offload import plan_summary

    dtype = parse_dtype(args.dtype) if args.dtype != "auto" else config.torch_dtype or torch.float32
    quantization = args.quantize or gguf_scheme  # a quantized GGUF loads quantized
    try:
        plan = plan_summary(config, dtype, quantization, parse_size(args.max_memory))
    except CheckpointError as e:  # too small even for the fewest experts: say so, as the plan
        plan = {"error": str(e)}
    return {**plan, "dtype": str(dtype).removeprefix("torch."),
            "quantization": args.quantize or (gguf_scheme and gguf_scheme["scheme"] + " (as the GGUF loads)")}


def cmd_convert(args: argparse.Namespace) -> int:
    from .model import MixtralForCausalLM
    from .tokenizer import copy_tokenizer_files

    to = args.to or ("gguf" if args.dst.endswith(".gguf") else "hub")
    gguf_types = ("f32", "f16", "bf16", "q8_0", "q4_0")
    if to == "gguf":
        gtype = (args.dtype or "f32").lower().replace("float32", "f32").replace("float16", "f16").replace(
            "bfloat16", "bf16")
        if gtype not in gguf_types:
            raise ValueError(f"--dtype for GGUF must be one of {gguf_types}, got {args.dtype!r}")
        dtype: Any = "float32"
    else:
        dtype = args.dtype or "auto"
    # float weights, whatever the source holds: every format written here stores them (a Q4_0 GGUF is dequantized)
    model = MixtralForCausalLM.from_pretrained(args.src, dtype=dtype, quantization="float")
    print(f"loaded {args.src} ({model.num_parameters():,} parameters, {model.dtype})", file=sys.stderr)
    if to == "hub":
        model.save_pretrained(args.dst, max_shard_size=args.max_shard_size)
        copy_tokenizer_files(args.src, args.dst)
    elif to == "mistral":
        from .checkpoint.mistral import save_mistral_checkpoint

        save_mistral_checkpoint(model, args.dst)
        copy_tokenizer_files(args.src, args.dst)
    else:
        from .checkpoint.gguf import read_gguf_tokenizer, save_gguf
        from .checkpoint.gguf_tokenizer import tokenizer_data_from_folder

        data = read_gguf_tokenizer(args.src) if args.src.endswith(".gguf") else tokenizer_data_from_folder(args.src)
        save_gguf(model, args.dst, dtype=gtype, tokenizer_data=data)
    print(f"wrote {args.dst} ({to})", file=sys.stderr)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .lora import LoraConfig
    from .train import TrainConfig, finetune

    if args.lora_r and args.train:
        raise ValueError("--lora-r (LoRA) and --train (full fine-tuning of parts) do not go together")
    lora = None
    if args.lora_r:
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r,
                          lora_dropout=args.lora_dropout, target_modules=args.lora_targets.split(","),
                          use_rslora=args.rslora)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                         max_grad_norm=args.max_grad_norm,
                         bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
                         router_z_loss_coef=args.router_z_loss_coef, eval_every=args.eval_every,
                         save_every=args.save_every, save_total_limit=args.save_total_limit, seed=args.seed)
    log = finetune(args.model, args.data, args.out, lora=lora, train=args.train.split(",") if args.train else None,
                   quantize=args.quantize, dtype=args.dtype, max_length=args.max_length, packing=args.packing,
                   eval_fraction=args.eval_fraction, config=config, resume=args.resume)
    last = log[-1] if log else {}
    summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "eval_loss", "eval_ppl") if k in last)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 tells
        print(f"wrote {args.out} ({'adapter' if lora else 'model'}); step {last.get('step', 0)}: {summary}",
              file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import ServeSettings, run_server
    except ImportError as e:
        raise RuntimeError(f"mixtral serve needs the server packages ({e.name} is missing): "
                           "pip install 'mixtral[serve]'") from None
    settings = ServeSettings(
        model=args.model, served_model_name=args.served_model_name, dtype=args.dtype, device=args.device,
        quantize=args.quantize, compile=args.compile, max_batch=args.max_batch, max_waiting=args.max_waiting,
        max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib, prefill_chunk=args.prefill_chunk,
        prefix_cache_tokens=0 if args.no_prefix_cache else args.prefix_cache_tokens,
        api_key=args.api_key or os.environ.get("MIXTRAL_API_KEY") or None, max_body_bytes=args.max_body_bytes,
        tp=args.tp, ep=args.ep, max_memory=args.max_memory, offload_folder=args.offload_folder, lora=args.lora)
    for name in ("max_batch", "max_waiting", "prefill_chunk", "max_body_bytes", "tp", "ep"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if settings.prefix_cache_tokens < 0:
        raise ValueError("--prefix-cache-tokens must be >= 0 (0, or --no-prefix-cache: no prefix cache)")
    if args.tp * args.ep > 1 and start_ranks(args) != 0:
        return _follow_server(settings)
    run_server(settings, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout)
    return 0


def _follow_server(settings: Any) -> int:
    """A rank other than 0 under `torchrun ... mixtral serve --tp/--ep`: no HTTP, the same engine steps as rank 0's,
    until rank 0 stops. Signals are rank 0's to act on (torchrun sends them to every rank): rank 0 finishes the
    running requests, then tells the others to return."""
    import signal

    from .parallel.mirror import follow
    from .serve.app import load_engine

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    follow(load_engine(settings)[2])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixtral", description="Run, inspect and convert Mixtral models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a prompt (streams to stdout)")
    p.add_argument("prompt")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--no-stream", action="store_true", help="print the continuation at the end")
    p.add_argument("--verbose", action="store_true", help="after the text, what offloaded experts cost (stderr)")
    _add_parallel_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the chat template; keeps the conversation")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: the "
                   "checkpoint folder's name)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 routes (default: "
                   "$MIXTRAL_API_KEY; none if unset)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (rows of the KV cache)")
    p.add_argument("--max-waiting", type=int, default=256, help="sequences that may wait for a row; past that, 429")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens per sequence "
                   "(default: the model's context, lowered so that the KV cache fits in --kv-cache-gib)")
    p.add_argument("--kv-cache-gib", type=float, default=4.0, help="KV cache size when --max-model-len is not given")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled between decode steps")
    p.add_argument("--prefix-cache-tokens", type=int, default=8192,
                   help="prompt tokens whose keys and values are kept, so that a prompt starting the same way (a "
                        "system prompt, earlier turns) is not prefilled again (Mixtral-8x7B bf16: 128 KiB a token)")
    p.add_argument("--no-prefix-cache", action="store_true", help="prefill every prompt from its first token")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get a 413")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds for running requests to finish before they are aborted")
    p.add_argument("--compile", action="store_true", help="compile the batched decode step (torch.compile on CPU: "
                   "faster steps, after one compile per batch-size bucket 1, 2, 4, ..., ~25 s each for a small model, "
                   "all at startup, before /health reports ready; under --tp/--ep on first use)")
    _add_parallel_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("finetune", help="LoRA, QLoRA or full fine-tuning on a .jsonl (text or chat messages) or "
                       ".txt file")
    p.add_argument("model", help="checkpoint folder or .gguf file ('demo': the built-in demo model)")
    p.add_argument("data", help=".jsonl with a \"text\" or a chat \"messages\" field a line (loss on the assistant "
                   "turns), or .txt")
    p.add_argument("--out", required=True, help="output folder: the adapter or model, checkpoints, metrics, plot")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="attention",
                   help="comma-separated: q_proj, k_proj, v_proj, o_proj, gate (router), gate_up_proj, down_proj, "
                        "or attention, experts, router, all")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r)")
    p.add_argument("--train", default=None, help="full fine-tuning of these parts only (comma-separated: attention, "
                   "experts, router, norms, embeddings, lm_head; default all)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None, help="QLoRA: the base in int8 or int4")
    p.add_argument("--dtype", default="float32", help="the base's dtype (float32, bfloat16)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--packing", action="store_true", help="pack several examples into each max-length row (each "
                   "attends only to itself, positions from 0)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="examples held out for evaluation")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at the end)")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    p.add_argument("--save-total-limit", type=int, default=None, help="checkpoints kept, the latest (default: all)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--router-z-loss-coef", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("info", help="config summary, parameter counts (total/active), dtype, size on disk")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="also print what loading with this budget keeps resident and offloads")
    p.add_argument("--dtype", default="auto", help="the dtype to plan for (default: the checkpoint's)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None, help="the quantization to plan for")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert between Hub safetensors, Mistral's format and GGUF")
    p.add_argument("src", help="checkpoint folder or .gguf file")
    p.add_argument("dst", help="output folder (hub, mistral) or .gguf file")
    p.add_argument("--to", choices=("hub", "mistral", "gguf"), default=None,
                   help="output format (default: gguf for a .gguf destination, else hub)")
    p.add_argument("--dtype", default=None,
                   help="hub/mistral: float32, bfloat16, float16 (default: keep); gguf: f32, f16, bf16, q8_0, q4_0")
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, TypeError, RuntimeError, OSError) as e:
        if os.environ.get("MIXTRAL_DEBUG"):
            raise
        print(f"mixtral: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
