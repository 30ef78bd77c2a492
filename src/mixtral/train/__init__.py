"""Fine-tuning: LoRA / QLoRA (mixtral.lora) or full training of chosen parts, on jsonl or text data.

    from mixtral.train import finetune, TrainConfig
    finetune("model/", "data.jsonl", "out/", lora=LoraConfig(r=16, target_modules=["attention", "experts"]),
             config=TrainConfig(steps=200, lr=2e-4, warmup_steps=20))

`mixtral finetune MODEL DATA --out DIR` is the same from the command line. The output folder gets the adapter (PEFT's
format) or the whole model, checkpoint-N folders (trainable weights, optimizer, schedule, RNG) to --resume from,
metrics.jsonl (loss, router losses, lr, tokens/s, eval loss and perplexity, each layer's expert load and router
entropy) and loss.png (with matplotlib). Under torchrun (`torchrun --nproc-per-node N -m mixtral finetune ...`) the
run is data parallel: each step's grad_accum x N micro-batches spread over the N processes.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .data import Example, load_examples, pack, split
from .loop import Trainer, TrainConfig, evaluate

__all__ = ["finetune", "TrainConfig", "Trainer", "evaluate", "load_examples", "pack", "Example", "unfreeze", "PARTS"]

# the parts of a model `--train` names, by module path (full fine-tuning of some of them)
PARTS = {"attention": (".self_attn.",), "experts": (".mlp.experts.",), "router": (".mlp.gate.",),
         "norms": ("layernorm.", "model.norm."), "embeddings": ("embed_tokens.",), "lm_head": ("lm_head.",)}


def unfreeze(model: torch.nn.Module, parts: list[str]) -> list[str]:
    """Train only these parts (any of PARTS, or "all"); returns the parameter names that train."""
    unknown = [p for p in parts if p not in PARTS and p != "all"]
    if unknown:
        raise ValueError(f"unknown part {unknown[0]!r} to train: expected some of {', '.join(PARTS)} or all")
    names = []
    for name, p in model.named_parameters():
        train = "all" in parts or any(key in name for part in parts for key in PARTS[part])
        p.requires_grad_(train)
        names += [name] if train else []
    if not names:
        raise ValueError(f"no parameter of this model belongs to {parts}")
    return names


def finetune(model: str | os.PathLike | None, data: str | os.PathLike, out_dir: str | os.PathLike, *,
             lora: Any = None, train: list[str] | None = None, quantize: str | None = None,
             dtype: str | torch.dtype = torch.float32, max_length: int = 512, packing: bool = False,
             eval_fraction: float = 0.05, config: TrainConfig | None = None, resume: bool = False,
             progress: bool = True) -> list[dict[str, Any]]:
    """Fine-tune a checkpoint (None: the demo model) on a data file; returns the metrics of each step.

    lora: a mixtral.lora.LoraConfig (over an int8/int4 base with quantize=: QLoRA); else `train` names the parts to
    train in full (default: all). packing: several examples a row of max_length tokens, blind to each other. The
    result goes to out_dir: the adapter, or the whole model and tokenizer."""
    from ..lora import apply_lora, save_adapter
    from ..pipeline import load_model_and_tokenizer

    config = config or TrainConfig()
    parallel = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: data parallel over its processes
        from ..parallel import DataParallel

        parallel = DataParallel()
    torch.manual_seed(config.seed)
    if quantize and lora is None:
        raise ValueError("full fine-tuning needs float weights: quantize= goes with lora= (QLoRA)")
    if model is not None and os.fspath(model) == "demo":
        model = None
    model_, tok = load_model_and_tokenizer(model, dtype=dtype, quantize=quantize, progress=progress)
    if lora is not None:
        apply_lora(model_, lora)
        save_final = save_adapter
    else:
        unfreeze(model_, train or ["all"])

        def save_final(m: Any, folder: str) -> None:
            from ..demo import demo_model_path
            from ..tokenizer import copy_tokenizer_files

            m.save_pretrained(folder, progress=progress)
            copy_tokenizer_files(model if model is not None else demo_model_path(), folder)

    examples = load_examples(data, tok, max_length)
    train_set, eval_set = split(examples, eval_fraction, config.seed)
    if packing:
        train_set, eval_set = pack(train_set, max_length), pack(eval_set, max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    trainer = Trainer(model_, train_set, eval_set, config, out_dir, pad, save_final, progress, parallel)
    if resume:
        trainer.resume()
    return trainer.train()

