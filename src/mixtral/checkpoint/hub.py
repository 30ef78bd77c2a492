"""The Hugging Face Hub layout: config.json + model.safetensors, or shards with model.safetensors.index.json.

Reads the classic per-expert keys (block_sparse_moe.experts.E.w1/w2/w3) and Transformers 5's fused ones
(mlp.experts.gate_up_proj / down_proj); writes the classic ones, which every loader understands.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..config import MixtralConfig
from .source import CheckpointError, SafetensorsSource
from .transforms import Recipe, stacked_experts, unstack_experts

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_GATE = re.compile(r"model\.layers\.(\d+)\.mlp\.gate\.weight")


def is_hub_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SINGLE_FILE)) or os.path.isfile(os.path.join(path, INDEX_FILE))


def open_hub_folder(path: str) -> SafetensorsSource:
    """The folder's tensors; checks that the index is readable and every shard it names exists."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is not a valid safetensors index: {e!r}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index_path} is not a valid safetensors index: weight_map must map tensor "
                                  "names to shard file names")
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(path, f))})
        if missing:
            raise CheckpointError(f"{path}: the index names shard(s) that are missing: {', '.join(missing)}")
        return SafetensorsSource({k: os.path.join(path, f) for k, f in weight_map.items()})
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return SafetensorsSource.from_files([single])
    raise CheckpointError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def hub_recipes(keys: list[str], source_keys: set[str], config: MixtralConfig) -> dict[str, Recipe]:
    """How each of our parameters (named as in MixtralForCausalLM) is read from a Hub-layout checkpoint."""
    # A checkpoint saved from the bare MixtralModel has no "model." prefix.
    prefix = "model." if any(k.startswith("model.") for k in source_keys) else ""

    def src(key: str) -> str:
        return prefix + key.removeprefix("model.") if key.startswith("model.") else key

    recipes = {}
    for key in keys:
        if (m := _EXPERTS.fullmatch(key)) and src(key) not in source_keys:
            layer, name = m.groups()
            rows = 2 * config.intermediate_size if name == "gate_up_proj" else config.hidden_size
            recipes[key] = stacked_experts(
                lambda e, w, layer=layer: f"{prefix}layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight",
                name, config.num_local_experts, rows)
        elif (m := _GATE.fullmatch(key)) and src(key) not in source_keys:
            recipes[key] = Recipe.copy(f"{prefix}layers.{m.group(1)}.block_sparse_moe.gate.weight")
        else:
            recipes[key] = Recipe.copy(src(key))
    return recipes


def hub_state_items(model: torch.nn.Module):
    """(Hub key, tensor) pairs of a model in the classic layout, expert by expert, without copying the model."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        m = re.fullmatch(r"(.*layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if m:
            for e, w, piece in unstack_experts(m.group(2), tensor):
                yield f"{m.group(1)}.block_sparse_moe.experts.{e}.{w}.weight", piece
        elif (m := re.fullmatch(r"(.*layers\.\d+)\.mlp\.gate\.weight", name)):
            yield f"{m.group(1)}.block_sparse_moe.gate.weight", tensor
        else:
            yield name, tensor


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {size!r}: use e.g. '5GB', '500MB' or a number of bytes")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def save_hub_checkpoint(model: torch.nn.Module, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                        progress: bool = True) -> None:
    """config.json + model.safetensors, or model-0000k-of-0000n.safetensors + index when over max_shard_size."""
    path = os.fspath(path)
    limit = parse_size(max_shard_size)
    os.makedirs(path, exist_ok=True)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for key, tensor in hub_state_items(model):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, tensor))
        size += nbytes
    for stale in os.listdir(path):  # shards of an earlier, differently sharded save would confuse loaders
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", stale):
            os.remove(os.path.join(path, stale))

    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    metadata = {"format": "pt"}
    if model.config.extra.get("quantization_config"):  # readers of the file alone can tell it is quantized
        metadata["quantization"] = json.dumps(model.config.extra["quantization_config"])
    for name, shard in tqdm(list(zip(names, shards)), desc="Writing shards", disable=not progress or n == 1):
        tensors = {k: t.detach().contiguous().cpu() for k, t in shard}
        save_file(tensors, os.path.join(path, name), metadata=metadata)
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        del tensors
    if n > 1:
        with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)

    config = model.config
    config.dtype = str(model.dtype).removeprefix("torch.")
    config.extra["architectures"] = [type(model).__name__]
    config.save_pretrained(path)
