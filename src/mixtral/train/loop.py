"""The fine-tuning loop: AdamW, cosine schedule with warmup, gradient accumulation normalized by tokens, clipping,
evaluation, checkpoints and a bit-exact resume.

Each optimizer step takes grad_accum micro-batches; each micro-batch's loss is its summed token loss over the whole
step's trained tokens (so that every token weighs the same, whatever the padding and accumulation), plus the
router losses (load balancing at the config's coefficient, padding excluded; z-loss if asked) weighted by the
micro-batch's share of those tokens. Micro-batch b is data.batch_at(b): a resumed run (the trainable weights,
optimizer, schedule and RNG state of a checkpoint) reads and computes exactly what the uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..model.losses import IGNORE_INDEX, causal_lm_loss, load_balancing_loss, router_z_loss
from .data import Example, batch_at, collate

STATE_NAME, TRAINABLE_NAME = "trainer_state.pt", "trainable.safetensors"


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 4  # examples a micro-batch
    grad_accum: int = 1  # micro-batches a step
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup, then cosine decay to min_lr_ratio * lr at the last step
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    bf16: bool = False  # bf16 autocast (CPU or CUDA)
    gradient_checkpointing: bool = False
    router_z_loss_coef: float = 0.0  # ST-MoE's router z-loss (1e-3 there); Mixtral has none
    eval_every: int = 0  # steps; 0: only at the end
    save_every: int = 0  # steps; 0: only at the end
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # recorded with the metrics (the command line, ...)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning rate at `step` (0-based) over cfg.lr: warmup, then cosine down to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _trained_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _losses(model: Any, batch: dict[str, torch.Tensor], z_loss: bool, bf16: bool) -> tuple[torch.Tensor, ...]:
    """(summed token loss, aux loss, z-loss or 0) of one micro-batch."""
    mc = model.config
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    output_router_logits=True)
    token_loss = causal_lm_loss(out.logits, batch["labels"], reduction="sum")
    aux = load_balancing_loss(out.router_logits, mc.num_local_experts, mc.num_experts_per_tok,
                              batch["attention_mask"])
    z = router_z_loss(out.router_logits, batch["attention_mask"]) if z_loss else aux.new_zeros(())
    return token_loss, aux, z


@torch.no_grad()
def evaluate(model: Any, examples: list[Example], batch_size: int, pad_token_id: int, bf16: bool = False) -> dict:
    """Mean token loss and perplexity over `examples` (labels as given)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_token_id)
        total += float(_losses(model, batch, False, bf16)[0])
        tokens += _trained_tokens(batch["labels"])
    model.train(was_training)
    loss = total / max(1, tokens)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


def trainable_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class Trainer:
    """Runs TrainConfig over a model whose trainable parameters are set (LoRA adapters, or parts of the model)."""

    def __init__(self, model: Any, train: list[Example], eval_examples: list[Example], cfg: TrainConfig,
                 out_dir: str | os.PathLike, pad_token_id: int, save_final: Any = None, progress: bool = True) -> None:
        self.model, self.train_set, self.eval_set, self.cfg = model, train, eval_examples, cfg
        self.out_dir, self.pad_token_id, self.progress = os.fspath(out_dir), pad_token_id, progress
        self.save_final = save_final  # (model, folder) -> None: the adapter or the whole model, at the end
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("no trainable parameters: apply LoRA (mixtral.lora.apply_lora) or unfreeze some")
        decay = [p for n, p in self.params.items() if p.dim() >= 2]
        no_decay = [p for n, p in self.params.items() if p.dim() < 2]  # norms, as is usual
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step = 0
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        from safetensors.torch import save_file

        folder = os.path.join(self.out_dir, f"checkpoint-{self.step}")
        os.makedirs(folder, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in self.params.items()}, os.path.join(folder, TRAINABLE_NAME))
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
                    "config": asdict(self.cfg)}, os.path.join(folder, STATE_NAME))
        return folder

    def resume(self, folder: str | os.PathLike | None = None) -> int:
        """Continue from `folder` (default: the latest checkpoint in out_dir); returns the step it starts at."""
        from safetensors.torch import load_file

        folder = os.fspath(folder) if folder else latest_checkpoint(self.out_dir)
        if folder is None:
            raise FileNotFoundError(f"--resume: no checkpoint-N folder in {self.out_dir}")
        saved = load_file(os.path.join(folder, TRAINABLE_NAME))
        if saved.keys() != self.params.keys():
            raise ValueError(f"{folder} holds other trainable parameters than this run's (a different --lora / "
                             f"--train?): {sorted(saved.keys() ^ self.params.keys())[:3]}")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(saved[name])
        state = torch.load(os.path.join(folder, STATE_NAME), weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step = state["step"]
        return self.step

    # ---- the loop --------------------------------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        cfg, model = self.cfg, self.model
        os.makedirs(self.out_dir, exist_ok=True)
        metrics_path = os.path.join(self.out_dir, "metrics.jsonl")
        if self.step == 0 and os.path.exists(metrics_path):  # a fresh run: not another run's records
            os.remove(metrics_path)
        log: list[dict[str, Any]] = []
        model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="Fine-tuning", disable=not self.progress)
        coef = model.config.router_aux_loss_coef
        while self.step < cfg.steps:
            start = time.perf_counter()
            batches = [collate(batch_at(self.train_set, self.step * cfg.grad_accum + i, cfg.batch_size, cfg.seed),
                               self.pad_token_id) for i in range(cfg.grad_accum)]
            tokens = sum(_trained_tokens(b["labels"]) for b in batches)
            loss_sum = aux_sum = z_sum = 0.0
            for batch in batches:
                share = _trained_tokens(batch["labels"]) / max(1, tokens)
                token_loss, aux, z = _losses(model, batch, bool(cfg.router_z_loss_coef), cfg.bf16)
                loss = token_loss / max(1, tokens) + share * (coef * aux + cfg.router_z_loss_coef * z)
                loss.backward()
                loss_sum += float(token_loss)
                aux_sum += share * float(aux)
                z_sum += share * float(z)
            grad_norm = (torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
                         if cfg.max_grad_norm else None)
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            seconds = time.perf_counter() - start
            record = {"step": self.step, "loss": loss_sum / max(1, tokens), "aux_loss": aux_sum, "z_loss": z_sum,
                      "lr": lr, "tokens": tokens, "tokens_per_s": tokens / seconds,
                      "grad_norm": None if grad_norm is None else float(grad_norm)}
            last = self.step == cfg.steps
            if (cfg.eval_every and self.step % cfg.eval_every == 0 or last) and self.eval_set:
                record.update(evaluate(model, self.eval_set, cfg.batch_size, self.pad_token_id, cfg.bf16))
            log.append(record)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 or last:
                self.save_checkpoint()
        bar.close()
        if self.save_final is not None:
            self.save_final(model, self.out_dir)
        plot_losses(metrics_path, os.path.join(self.out_dir, "loss.png"))
        return log


def latest_checkpoint(out_dir: str) -> str | None:
    steps = [int(name.split("-", 1)[1]) for name in os.listdir(out_dir) if name.startswith("checkpoint-")
             and name.split("-", 1)[1].isdigit()] if os.path.isdir(out_dir) else []
    return os.path.join(out_dir, f"checkpoint-{max(steps)}") if steps else None


def plot_losses(metrics_path: str, png: str) -> bool:
    """The training (and eval) loss curve as a PNG, where matplotlib is installed; whether it was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats a token)")
    ax.legend()
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True
