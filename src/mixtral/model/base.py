"""What every Mixtral class shares: the config, weight init, loading/saving, gradient checkpointing."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..config import MixtralConfig
from .attention import check_attn_implementation
from .moe import Experts, Router
from .norm import RMSNorm


class MixtralPreTrainedModel(nn.Module):
    config_class = MixtralConfig
    base_model_prefix = "model"

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        if not isinstance(config, MixtralConfig):
            raise TypeError(f"expected a MixtralConfig, got {type(config).__name__}")
        check_attn_implementation(config._attn_implementation)
        self.config = config
        self.gradient_checkpointing = False

    # ---- initialisation --------------------------------------------------------------------------------
    def post_init(self) -> None:
        """Initialise fresh weights (skipped on the meta device, where loading fills them) and tie."""
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()
        self.tie_weights()

    @torch.no_grad()
    def init_weights(self, modules: list[nn.Module] | None = None) -> None:
        """Transformers' init: normal(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        for m in modules if modules is not None else self.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, Router):
                m.weight.normal_(0.0, std)
            elif isinstance(m, Experts):
                m.gate_up_proj.normal_(0.0, std)
                m.down_proj.normal_(0.0, std)

    def tie_weights(self) -> None:
        """Share lm_head and the embedding when the config asks for it (only the causal LM has a head to tie)."""

    # ---- conveniences Transformers users reach for ------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def offload_stats(self) -> dict[str, Any] | None:
        """Offloaded experts' hits, misses, hit rate and bytes read, in all and per layer; None without offload."""
        from ..offload import offload_stats

        return offload_stats(self)

    def num_parameters(self, only_trainable: bool = False) -> int:
        params = {id(p): p for p in self.parameters() if p.requires_grad or not only_trainable}
        return sum(p.numel() for p in params.values())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each decoder layer in backward instead of storing its activations (training only)."""
        for m in self.modules():
            if isinstance(m, MixtralPreTrainedModel):
                m.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for m in self.modules():
            if isinstance(m, MixtralPreTrainedModel):
                m.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.gradient_checkpointing

    # ---- checkpoints ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
        config: MixtralConfig | None = None,
        progress: bool = True,
        torch_dtype: str | torch.dtype | None = None,
        quantization: str | dict[str, Any] | None = None,
        tp: int = 1,
        ep: int = 1,
        device_map: str | int | torch.device | dict[str, Any] | None = None,
        max_memory: dict[int | str, int | str] | None = None,
        offload_folder: str | os.PathLike | None = None,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        quantization_config: Any = None,
        low_cpu_mem_usage: bool | None = None,
        trust_remote_code: bool | None = None,
        **config_overrides: Any,
    ):
        """Load a Hub folder (single or sharded safetensors), Mistral's consolidated format, or a repo id.

        Built on the meta device and filled from memory-mapped files: no random init, no second copy.
        quantization="int8" | "int4" (or {"scheme": "int4", "group_size": 32}) quantizes each weight as it is
        read, as mixtral.quantize would after loading, so that the float model never exists whole. A quantized
        GGUF stays quantized: Q4_0 matrices as stored (int4, groups of 32), other types re-quantized to the
        nearest scheme as they are read; quantization="float" dequantizes every weight.
        device_map="auto" with max_memory and offload_folder keeps the experts that do not fit on disk
        (mixtral.offload); offload_stats() says what they cost.
        tp=N / ep=M (under torchrun, N x M processes): tensor / expert parallel, on a 2-D mesh when both; each rank
        reads only its slices of the memory-mapped safetensors, so that its memory is about its share of the weights.
        Transformers' device_map, max_memory, offload_folder, load_in_8bit, load_in_4bit and quantization_config map
        onto device and quantization, or are a clear error (see mixtral.checkpoint.placement). low_cpu_mem_usage
        (loading is always low-memory) and trust_remote_code (no code comes from a checkpoint) change nothing.
        """
        from ..checkpoint import placement
        from ..checkpoint.loading import load_pretrained

        placement.check_needs_map(device_map, max_memory=max_memory, offload_folder=offload_folder)
        device = placement.resolve_device(device, device_map)
        budget = None if device_map is None else placement.device_budget(device or torch.device("cpu"), max_memory,
                                                                          device_map)
        quantization = placement.resolve_quantization(quantization, load_in_8bit, load_in_4bit, quantization_config)
        return load_pretrained(cls, path, dtype=torch_dtype if torch_dtype is not None else dtype, device=device,
                               attn_implementation=attn_implementation, config=config, progress=progress,
                               config_overrides=config_overrides, quantization=quantization, tp=tp, ep=ep,
                               budget=budget, may_offload=isinstance(device_map, str) and
                               device_map in placement.AUTO_MAPS, offload_folder=offload_folder)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                        progress: bool = True) -> None:
        """Write config.json and Hub-layout safetensors (per-expert w1/w2/w3), sharded with an index if large."""
        from ..checkpoint.hub import save_hub_checkpoint

        if self.offload_stats() is not None:
            raise NotImplementedError("this model keeps experts on disk (offload_folder): it cannot be saved; load it "
                                      "without max_memory/offload_folder to save it")

        save_hub_checkpoint(self, path, max_shard_size=max_shard_size, progress=progress)
