"""The fine-tuning loop: AdamW, cosine schedule with warmup, gradient accumulation normalized by tokens, clipping,
evaluation, checkpoints and a bit-exact resume, on one process or data parallel over torchrun's.

Each optimizer step takes grad_accum micro-batches; each micro-batch's loss is its summed token loss over the whole
step's trained tokens (so that every token weighs the same, whatever the padding and accumulation), plus the
router losses (load balancing at the config's coefficient, padding excluded; z-loss if asked) weighted by the
micro-batch's share of those tokens. Micro-batch b is data.batch_at(b): a resumed run (the trainable weights,
optimizer, schedule and RNG state of a checkpoint) reads and computes exactly what the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from ..model.attention import packed_mask
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
    save_total_limit: int | None = None  # checkpoints kept (the latest); None: all (a full 8x7B one is ~560 GB)
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


class MicroBatch(NamedTuple):
    token_loss: torch.Tensor  # summed over the trained tokens
    aux: torch.Tensor  # load balancing, padding excluded
    z: torch.Tensor  # router z-loss, or 0 when not asked for
    load: torch.Tensor  # (L, E): top-k assignments to each expert, over the unpadded tokens (no grad)
    entropy: torch.Tensor  # (L,): the router distributions' entropy summed over the unpadded tokens (no grad)


def _forward(model: Any, config: Any, batch: dict[str, torch.Tensor], z_loss: bool, bf16: bool) -> MicroBatch:
    """One micro-batch through `model` (the model, or its DDP wrapper): its losses and routing."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    positions = batch.get("position_ids")  # packed rows: each document sees only itself
    mask = batch["attention_mask"] if positions is None else packed_mask(positions, config.sliding_window)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=False,
                    output_router_logits=True)
    token_loss = causal_lm_loss(out.logits, batch["labels"], reduction="sum")
    real = batch["attention_mask"]  # (B, S): not padding
    aux = load_balancing_loss(out.router_logits, config.num_local_experts, config.num_experts_per_tok, real)
    z = router_z_loss(out.router_logits, real) if z_loss else aux.new_zeros(())
    with torch.no_grad():
        logits_LTE = torch.stack([r.float() for r in out.router_logits])  # (L, B*S, E)
        keep_T = real.reshape(-1).bool()
        probs_LTE = logits_LTE[:, keep_T].softmax(-1)
        top_LTK = probs_LTE.topk(config.num_experts_per_tok, dim=-1).indices
        load = torch.nn.functional.one_hot(top_LTK, config.num_local_experts).sum(dim=(1, 2)).float()  # (L, E)
        entropy = -(probs_LTE * probs_LTE.clamp_min(1e-20).log()).sum(dim=(1, 2))  # (L,)
    return MicroBatch(token_loss, aux, z, load, entropy)


@torch.no_grad()
def evaluate(model: Any, examples: list[Example], batch_size: int, pad_token_id: int, bf16: bool = False,
             parallel: Any = None) -> dict:
    """Mean token loss and perplexity over `examples` (labels as given); under data parallelism each rank takes
    every world-th example and the sums are added up."""
    parallel = parallel or SingleProcess()
    was_training = model.training
    model.eval()
    mine = examples[parallel.rank::parallel.world]
    sums = torch.zeros(2, dtype=torch.float64)  # (loss, tokens)
    for i in range(0, len(mine), batch_size):
        batch = collate(mine[i:i + batch_size], pad_token_id)
        sums += torch.tensor([float(_forward(model, model.config, batch, False, bf16).token_loss),
                              _trained_tokens(batch["labels"])], dtype=torch.float64)
    total, tokens = parallel.sum(sums).tolist()
    model.train(was_training)
    loss = total / max(1, tokens)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(tokens)}


class SingleProcess:
    """One process: what mixtral.parallel.DataParallel answers for a world of ranks."""

    rank, world = 0, 1

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def no_sync(self, wrapped: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def gather(self, obj: Any) -> list[Any]:
        return [obj]


def trainable_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class Trainer:
    """Runs TrainConfig over a model whose trainable parameters are set (LoRA adapters, or parts of the model);
    with `parallel` (mixtral.parallel.DataParallel, under torchrun) on every rank, each step's micro-batches are
    spread over the ranks and rank 0 writes the metrics, checkpoints and result."""

    def __init__(self, model: Any, train: list[Example], eval_examples: list[Example], cfg: TrainConfig,
                 out_dir: str | os.PathLike, pad_token_id: int, save_final: Any = None, progress: bool = True,
                 parallel: Any = None) -> None:
        self.model, self.train_set, self.eval_set, self.cfg = model, train, eval_examples, cfg
        self.out_dir, self.pad_token_id = os.fspath(out_dir), pad_token_id
        self.save_final = save_final  # (model, folder) -> None: the adapter or the whole model, at the end
        self.parallel = parallel or SingleProcess()
        self.main = self.parallel.rank == 0  # the rank that writes
        self.progress = progress and self.main
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("no trainable parameters: apply LoRA (mixtral.lora.apply_lora) or unfreeze some")
        if any(getattr(m, "lora_merged", False) for m in model.modules()):
            raise ValueError("the adapters are merged into the weights: unmerge_adapter() before training them")
        if self.parallel.world > 1:
            torch.manual_seed(cfg.seed + 1_000_003 * self.parallel.rank)  # each rank its own dropout
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.forward_model = self.parallel.wrap(model)
        decay = [p for n, p in self.params.items() if p.dim() >= 2]
        no_decay = [p for n, p in self.params.items() if p.dim() < 2]  # norms, as is usual
        # fused: one kernel over all the tensors (Transformers' default too); on CPU 7x faster than the foreach form,
        # which took 40% of a full fine-tuning step (measured on the bench config)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in self.params.values())
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step = 0

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        from safetensors.torch import save_file

        folder = os.path.join(self.out_dir, f"checkpoint-{self.step}")
        rng = self.parallel.gather(torch.get_rng_state())  # every rank's, for its dropout after a resume
        if self.main:
            os.makedirs(folder, exist_ok=True)
            self._check_disk(folder)
            save_file({n: p.detach().contiguous() for n, p in self.params.items()},
                      os.path.join(folder, TRAINABLE_NAME))
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "rng": rng, "config": asdict(self.cfg)},
                       os.path.join(folder, STATE_NAME))
            self._drop_old_checkpoints()
        return folder

    def _check_disk(self, folder: str) -> None:
        """A clear error before writing a checkpoint that the disk cannot hold (torch.save's own is cryptic)."""
        weights = sum(p.numel() * p.element_size() for p in self.params.values())
        need = 3 * weights + (64 << 20)  # the weights, AdamW's two moments, some slack
        free = shutil.disk_usage(folder).free
        if free < need:
            raise OSError(f"not enough disk space for {folder}: a checkpoint takes ~{need / 2**30:.2f} GiB (the "
                          f"trainable weights and AdamW's two moments), {free / 2**30:.2f} GiB are free; free some, "
                          "or keep fewer checkpoints (save_total_limit / --save-total-limit)")

    def _drop_old_checkpoints(self) -> None:
        if self.cfg.save_total_limit is None:
            return
        steps = sorted(checkpoint_steps(self.out_dir))
        for step in steps[:max(0, len(steps) - self.cfg.save_total_limit)]:
            shutil.rmtree(os.path.join(self.out_dir, f"checkpoint-{step}"))

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
        if len(state["rng"]) != self.parallel.world:
            raise ValueError(f"{folder} was written by {len(state['rng'])} process(es); resume it with as many "
                             f"(this run has {self.parallel.world})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"][self.parallel.rank])
        self.step = state["step"]
        return self.step

    # ---- the loop --------------------------------------------------------------------------------------------
    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the current step: of the step's grad_accum x world, every world-th."""
        cfg, world, rank = self.cfg, self.parallel.world, self.parallel.rank
        first = self.step * cfg.grad_accum * world
        return [collate(batch_at(self.train_set, first + i * world + rank, cfg.batch_size, cfg.seed),
                        self.pad_token_id) for i in range(cfg.grad_accum)]

    def train(self) -> list[dict[str, Any]]:
        cfg, model, config = self.cfg, self.model, self.model.config
        metrics_path = os.path.join(self.out_dir, "metrics.jsonl")
        if self.main:
            os.makedirs(self.out_dir, exist_ok=True)
            if self.step == 0 and os.path.exists(metrics_path):  # a fresh run: not another run's records
                os.remove(metrics_path)
        log: list[dict[str, Any]] = []
        if self.step == 0 and self.eval_set:  # where the held-out loss starts
            log.append({"step": 0, **evaluate(model, self.eval_set, cfg.batch_size, self.pad_token_id, cfg.bf16,
                                              self.parallel)})
            if self.main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(log[-1]) + "\n")
        model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="Fine-tuning", disable=not self.progress)
        coef, world = config.router_aux_loss_coef, self.parallel.world
        layers, experts = config.num_hidden_layers, config.num_local_experts
        while self.step < cfg.steps:
            start = time.perf_counter()
            batches = self._micro_batches()
            mine = [_trained_tokens(b["labels"]) for b in batches]
            tokens = int(self.parallel.sum(torch.tensor([sum(mine)], dtype=torch.float64)))  # the whole step's
            # (loss, aux, z, unpadded tokens, expert load (L, E), router entropy (L,)), summed over the micro-batches
            sums = torch.zeros(4 + layers * experts + layers, dtype=torch.float64)
            for i, batch in enumerate(batches):
                share = mine[i] / max(1, tokens)
                with self.parallel.no_sync(self.forward_model, last=i == len(batches) - 1):
                    mb = _forward(self.forward_model, config, batch, bool(cfg.router_z_loss_coef), cfg.bf16)
                    loss = mb.token_loss / max(1, tokens) + share * (coef * mb.aux + cfg.router_z_loss_coef * mb.z)
                    (loss * world).backward()  # DDP averages over the ranks; the step's gradient is their sum
                losses = [float(mb.token_loss.detach()), share * float(mb.aux.detach()), share * float(mb.z.detach())]
                sums += torch.cat([torch.tensor([*losses, int(batch["attention_mask"].sum())]),
                                   mb.load.flatten().double().cpu(), mb.entropy.double().cpu()])
            sums = self.parallel.sum(sums)
            grad_norm = (torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
                         if cfg.max_grad_norm else None)
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            seconds = time.perf_counter() - start
            seen = float(sums[3])
            load = sums[4:4 + layers * experts].view(layers, experts)
            record = {"step": self.step, "loss": float(sums[0]) / max(1, tokens), "aux_loss": float(sums[1]),
                      "z_loss": float(sums[2]), "lr": lr, "tokens": tokens, "tokens_per_s": tokens / seconds,
                      "grad_norm": None if grad_norm is None else float(grad_norm),
                      "expert_load": (load / load.sum(-1, keepdim=True).clamp_min(1)).round(decimals=4).tolist(),
                      "router_entropy": (sums[4 + layers * experts:] / max(1.0, seen)).round(decimals=4).tolist()}
            last = self.step == cfg.steps
            if (cfg.eval_every and self.step % cfg.eval_every == 0 or last) and self.eval_set:
                record.update(evaluate(model, self.eval_set, cfg.batch_size, self.pad_token_id, cfg.bf16,
                                       self.parallel))
            log.append(record)
            if self.main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 or last:
                self.save_checkpoint()
        bar.close()
        if self.main:
            if self.save_final is not None:
                self.save_final(model, self.out_dir)
            plot_metrics(metrics_path, os.path.join(self.out_dir, "loss.png"))
        return log


def checkpoint_steps(out_dir: str) -> list[int]:
    return [int(name.split("-", 1)[1]) for name in os.listdir(out_dir) if name.startswith("checkpoint-")
            and name.split("-", 1)[1].isdigit()] if os.path.isdir(out_dir) else []


def latest_checkpoint(out_dir: str) -> str | None:
    steps = checkpoint_steps(out_dir)
    return os.path.join(out_dir, f"checkpoint-{max(steps)}") if steps else None


def plot_metrics(metrics_path: str, png: str) -> bool:
    """The loss curves, each layer's router entropy over the steps and the last step's expert load (layers x
    experts) as a PNG, where matplotlib is installed; whether it was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if "eval_loss" in r]
    records = [r for r in records if "loss" in r]  # the training steps (step 0: the eval before training)
    if not records:
        return False
    steps = [r["step"] for r in records]
    fig, (ax, ent, heat) = plt.subplots(1, 3, figsize=(15, 4))
    ax.plot(steps, [r["loss"] for r in records], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set(xlabel="step", ylabel="loss (nats a token)")
    ax.legend()
    entropy = [r["router_entropy"] for r in records]
    for layer in range(len(entropy[0])):
        ent.plot(steps, [e[layer] for e in entropy], label=f"layer {layer}")
    ent.set(xlabel="step", ylabel="router entropy (nats)", title="routing spread")
    if len(entropy[0]) <= 8:
        ent.legend(fontsize="small")
    image = heat.imshow(records[-1]["expert_load"], aspect="auto", cmap="viridis")
    heat.set(xlabel="expert", ylabel="layer", title=f"expert load at step {steps[-1]}")
    fig.colorbar(image, ax=heat, label="share of the layer's assignments")
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True
