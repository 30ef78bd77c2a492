"""from_pretrained: find the checkpoint, build the model on the meta device, fill it tensor by tensor.

Strict: every parameter must come from the checkpoint and every checkpoint tensor must be used, except
what a user of Transformers expects to be skipped or created (a task head on a causal-LM checkpoint).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import warnings
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import hugepages
from ..config import MixtralConfig, parse_dtype
from .hub import hub_recipes, is_hub_folder, open_hub_folder
from .mistral import is_mistral_folder, mistral_recipes, open_mistral_folder
from .placement import check_fits
from .slices import Sharding, box_of, full_box, intersect, shift
from .source import CheckpointError
from .transforms import Part, Recipe

# Checkpoint keys that carry nothing we need: old rotary caches, a causal LM's head under a task head.
_IGNORABLE = re.compile(r".*rotary_emb\.inv_freq")
_QUANT_SCALES = re.compile(r".*[._](scale|scales|zeros)")


def resolve_path(path: str | os.PathLike) -> str:
    """A local folder, or a Hub repo id fetched with huggingface_hub (when installed and reachable)."""
    path = os.fspath(path)
    if os.path.exists(path):
        return path
    looks_like_repo = re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None and not path.startswith((".", "/"))
    if not looks_like_repo:
        raise FileNotFoundError(f"No such model folder or file: {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{path} is not a local folder, and huggingface_hub is not installed to fetch it "
                                f"from the Hub (pip install huggingface_hub)") from None
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "consolidated*"])
    except Exception as e:  # offline, unknown repo, gated repo...: all mean "not here"
        raise FileNotFoundError(f"{path} is not a local folder and could not be fetched from the Hub: "
                                f"{type(e).__name__}: {e}") from None


def _target_dtype(dtype: str | torch.dtype | None, config: MixtralConfig, source: Any, keys: list[str]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype != "auto":
        return parse_dtype(dtype)
    if config.torch_dtype is not None:
        return config.torch_dtype
    for key in keys:
        found = source.dtype(key)
        if found is not None and found.is_floating_point:
            return found
    return torch.float32


def _assemble(recipe: Recipe, shape: torch.Size, source: Any, dtype: torch.dtype, device: torch.device,
              name: str, sharding: Sharding | None = None) -> torch.Tensor:
    """Build one parameter from its parts, checking each part's shape before reading it. With a sharding (a
    parallel rank's share of the parameter), only the boxes of each checkpoint tensor that the share holds are read."""
    target = torch.empty(sharding.full if sharding else shape, device="meta")
    for part in recipe.parts:
        want, got = tuple(target[part.index].shape), source.shape(part.key)
        if want != got:
            where = f" (part of {name})" if part.key != name else ""
            raise CheckpointError(f"shape mismatch for {part.key}{where}: checkpoint has {got}, model expects {want}")
    # Always a copy: a tensor read from a safetensors (or mmap'd .pth) file aliases the file's memory map, and one
    # such alias would keep the whole shard mapped, its page cache counted in RSS, for the model's lifetime.
    out = hugepages.empty(shape, dtype, device)
    for part in recipe.parts:
        if sharding is None:
            t = source.load(part.key)
            out[part.index].copy_(part.transform(t) if part.transform else t)
            continue
        box, dropped = box_of(part.index, target.shape)  # where this checkpoint tensor lands in the full parameter
        for dst, src in sharding.pieces:
            common = intersect(box, src)
            if common is not None:
                inside = shift(common, box, full_box(target.shape))  # the box, in the part's own coordinates
                t = _read(source, part, tuple(s for d, s in enumerate(inside) if d not in dropped))
                where = shift(common, src, dst)
                out[where].copy_(t.reshape(out[where].shape))
    return out


def _read(source: Any, part: Part, index: tuple[slice, ...]) -> torch.Tensor:
    """A box of one checkpoint tensor: read alone where the source can (safetensors), else sliced once read. A
    transform (the q/k row permutation) needs the whole tensor: those are read whole (one H x H matrix)."""
    if part.transform is not None:
        t = part.transform(source.load(part.key))[index]
    elif hasattr(source, "load_slice"):
        t = source.load_slice(part.key, index)
    else:
        t = source.load(part.key)[index]
    # unmapped at once: the file pages a slice touched (all of them, for a slice of columns) would otherwise stay
    # in RSS until the shard's last tensor is read, several of them at a time
    for file in _files(Recipe([part]), source):
        source.release(file)
    return t


def _row_blocks(recipe: Recipe, ndim: int) -> list[tuple[tuple, Recipe]] | None:
    """(index, recipe) per checkpoint tensor, when each fills a contiguous block of whole rows of the parameter
    (e.g. expert e's w1: index (e, slice(0, I))); None when one does not (a stacked GGUF tensor, slice(None))."""
    def fills_rows(index: tuple) -> bool:  # ints, then at most one slice of rows, leaving (rows, K) or more
        ints = index[:-1] if index and isinstance(index[-1], slice) else index
        return (all(isinstance(i, int) for i in ints) and all(s.step in (None, 1) for s in index[len(ints):])
                and ndim - len(ints) >= 2)

    if not all(fills_rows(part.index) for part in recipe.parts):
        return None
    return [(part.index, Recipe([Part(part.key, (), part.transform)])) for part in recipe.parts]


def _files(recipe: Recipe, source: Any) -> set[str]:
    shard_of = getattr(source, "weight_map", {})  # safetensors sources only: the files release() unmaps
    return {shard_of[part.key] for part in recipe.parts if part.key in shard_of}


def _assemble_quantized(quantizer: Any, name: str, recipe: Recipe, shape: torch.Size, source: Any,
                        dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """The buffers that replace one float weight: read in `dtype`, quantized, dropped, one checkpoint tensor at a
    time where each fills whole rows (quantization is per row), its file pages unmapped after each, so that one
    checkpoint tensor's float copy (e.g. one expert's w1) is the most that ever exists."""
    out = quantizer.empty(name, tuple(shape), device)
    meta = torch.empty(shape, device="meta")
    # GGUF's Q4_0 and Q8_0 blocks are int4 and int8 groups of 32 already: taken as they are
    native = {("int4", 32): "q4_0", ("int8", 32): "q8_0"}.get(quantizer.scheme_of(name)[:2])
    if native and not all(getattr(source, f"is_{native}", lambda key: False)(p.key) for p in recipe.parts):
        native = None
    for index, part in _row_blocks(recipe, len(shape)) or [((), recipe)]:
        if native:
            _copy_blocks(native, out, quantizer, name, index, part, source, meta)
            continue
        w = _assemble(part, meta[index].shape, source, dtype, device, name)
        quantizer.quantize_into(out, name, w, index)
        del w
        for file in _files(part, source):
            source.release(file)
        _trim_heap()
    return out


def _copy_blocks(kind: str, out: dict[str, torch.Tensor], quantizer: Any, name: str, index: tuple, recipe: Recipe,
                 source: Any, meta: torch.Tensor) -> None:
    """Fill out[...][index] (the buffers of weight `name`) with the recipe's GGUF tensors of `kind`: Q8_0 as int8 in
    groups of 32; Q4_0 as stored (symmetric int4), or with zeros -8d beside them for asymmetric buffers (exact in
    fp16). A row permutation (q/k) applies to every buffer's rows alike."""
    symmetric = quantizer.scheme_of(name)[2]
    for part in recipe.parts:
        want, got = tuple(meta[index][part.index].shape), source.shape(part.key)
        if want != got:
            raise CheckpointError(f"shape mismatch for {part.key} (part of {name}): checkpoint has {got}, model "
                                  f"expects {want}")
        parts = source.load_q8_0(part.key) if kind == "q8_0" else source.load_q4_0(part.key)
        if kind == "q4_0" and not symmetric:
            parts["zeros"] = -8 * parts["scales"]
        for buffer, t in parts.items():
            out[quantizer.buffer(name, buffer)][index][part.index].copy_(part.transform(t) if part.transform else t)


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the OS. glibc's malloc keeps the float copies and temporaries freed
    while quantizing, in RSS for the model's lifetime (measured on the bench model: +5% of the int8 model)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only; elsewhere there is nothing to do
    except (AttributeError, OSError, TypeError):
        return None


def load_pretrained(cls, path, *, dtype, device, attn_implementation, config, progress, config_overrides,
                    quantization=None, tp=1, ep=1, budget=None, may_offload=False, offload_folder=None):
    """See MixtralPreTrainedModel.from_pretrained; budget: the bytes the weights may take on `device` (checked
    before any is read); may_offload: past the budget, keep experts in `offload_folder` (mixtral.offload)."""
    from ..model.attention import check_attn_implementation
    from ..model.mixtral import MixtralForCausalLM, MixtralModel

    folder = resolve_path(path)
    is_gguf = os.path.isfile(folder) and folder.lower().endswith(".gguf")
    if os.path.isfile(folder) and not is_gguf:
        raise CheckpointError(f"{folder} is a file: pass the folder that holds config.json and the weights, "
                              "or a .gguf file")
    if config is None and not is_gguf:
        config = MixtralConfig.from_pretrained(folder, **config_overrides)
    if is_gguf:
        from .gguf import open_gguf  # the gguf package is imported only for GGUF files

        gguf_config, source, plan = open_gguf(folder, progress=progress, **config_overrides)
        config = gguf_config if config is None else config
    elif is_hub_folder(folder):
        source, plan = open_hub_folder(folder), hub_recipes
    elif is_mistral_folder(folder):
        source, plan = open_mistral_folder(folder), mistral_recipes
    else:
        raise CheckpointError(f"{folder} holds no weights: expected model.safetensors, model.safetensors.index.json, "
                              "or Mistral's params.json + consolidated.safetensors")
    config._attn_implementation = check_attn_implementation(attn_implementation or config._attn_implementation)
    device = torch.device(device) if device is not None else torch.device("cpu")
    # A quantized GGUF stays quantized unless asked otherwise (see GGUFSource.nearest_scheme): Q4_0 and Q8_0
    # matrices as they are, others re-quantized as each is read; its output layer and token embeddings as stored
    # where they are Q8_0 or Q4_0, else in floating point. ("int4" asked of a Q4_0 file, "int8" of a Q8_0 one: the
    # same)
    nearest = source.nearest_scheme() if is_gguf and tp * ep == 1 else None
    gguf_default = nearest is not None and (quantization is None or quantization == "int4" and source.stores_q4_0()
                                            or quantization == "int8" and source.stores_q8_0())
    head, embed = (source.stored_scheme(key) if gguf_default else False for key in ("output.weight",
                                                                                      "token_embd.weight"))
    if gguf_default:
        quantization = nearest
        if not (source.stores_q4_0() or source.stores_q8_0()):
            warnings.warn(f"{os.path.basename(folder)}: its quantized matrices are re-quantized to "
                          f"{quantization['scheme']} as they are read (quantization='float' dequantizes them)",
                          stacklevel=3)
    elif quantization == "float":  # every weight in floating point (a quantized GGUF: dequantized)
        quantization = None

    shardings: dict[str, Sharding] = {}
    with torch.device("meta"):
        model = cls(config)
        saved, quantizer = config.extra.pop("quantization_config", None), None
        if tp * ep > 1:  # each rank builds its share of the model, then reads only that share's slices
            if saved:
                raise CheckpointError(f"{folder} is quantized: tp/ep shard float weights (quantize after loading)")
            from ..parallel.launch import shard_before_loading

            shardings = shard_before_loading(model, tp, ep, device)
        elif saved or quantization is not None:  # swap in empty quantized modules, which loading then fills
            from ..quantize import load_quantizer

            quantizer = load_quantizer(model, quantization, saved, lm_head=head if gguf_default else True,
                                       embed_tokens=embed)
    # Our names, spelled as in MixtralForCausalLM ("model." + backbone key), which the format plans expect; when
    # quantizing while loading, the float model's, whose weights the quantizer turns into its buffers as they come.
    own = dict(quantizer.float_state if quantizer else model.state_dict(keep_vars=True))
    if cls is MixtralModel:
        own = {f"model.{k}": p for k, p in own.items()}
        shardings = {f"model.{k}": v for k, v in shardings.items()}
    tied = config.tie_word_embeddings and "lm_head.weight" in own
    if tied:
        del own["lm_head.weight"]
    source_keys = set(source.keys())
    recipes = plan(list(own), source_keys, config)
    dtype = _target_dtype(dtype, config, source, sorted(source_keys))
    slots = _offload_slots(model, dtype, device, budget, may_offload, offload_folder, tp * ep)

    head_only = [k for k in own if not k.startswith("model.") and cls is not MixtralForCausalLM]
    fresh = [k for k in head_only if any(p.key not in source_keys for p in recipes[k].parts)]
    missing = [p.key for k, r in recipes.items() if k not in fresh for p in r.parts if p.key not in source_keys]
    used = {p.key for k, r in recipes.items() if k not in fresh for p in r.parts}
    unexpected = [k for k in sorted(source_keys - used) if not _IGNORABLE.fullmatch(k)
                  and not (k.startswith("lm_head.") and (tied or cls is not MixtralForCausalLM))]
    if missing or unexpected:
        lines = [f"{folder} does not match {cls.__name__} with this config:"]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): {', '.join(unexpected[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))
        raise CheckpointError("\n".join(lines))

    state: dict[str, torch.Tensor] = {}
    todo = [k for k in own if k not in fresh]
    offloader = None
    if slots is not None:  # each layer's experts go to the store as they are read (or were laid out before)
        from ..offload.loading import OffloadLoader

        offloader = OffloadLoader(model, slots, offload_folder, list(source.files), dtype, device)
        todo = [k for k in todo if not offloader.skips(k)]
    name_of = {k: k.removeprefix("model.") if cls is MixtralModel else k for k in todo}
    if quantizer:  # float weights first, so that their file pages come and go before the quantized ones pile up;
        # then the quantized ones by size, largest first, so that an untied LM head (read whole: its float copy is the
        # largest transient) comes before most quantized weights exist (int4 bench model: peak 1.43x -> 1.14x)
        todo.sort(key=lambda k: (name_of[k] in quantizer, -own[k].numel() if name_of[k] in quantizer else 0))
    # Unmap each safetensors shard once its last tensor is copied, so that about one shard stays resident at a time;
    # when quantizing, after every weight, as a shard's float pages would outweigh the quantized model.
    last_use = {} if quantizer else {file: key for key in todo for file in _files(recipes[key], source)}
    bar = tqdm(todo, desc=f"Loading {len(source.files)} shards", disable=not progress or len(source.files) <= 1)
    for key in bar:
        param, name = own[key], name_of[key]
        if quantizer and name in quantizer:
            state.update(_assemble_quantized(quantizer, name, recipes[key], param.shape, source, dtype, device))
        else:
            keep = not param.is_floating_point() or _QUANT_SCALES.fullmatch(key)  # int codes; scales in their own dtype
            state[name] = _assemble(recipes[key], param.shape, source, param.dtype if keep else dtype, device, key,
                                    shardings.get(key))
        if offloader and offloader.absorb(state):
            _trim_heap()  # the layer's experts were freed: give their pages back rather than keep them in RSS
        for shard in _files(recipes[key], source) if quantizer else [f for f, k in last_use.items() if k == key]:
            source.release(shard)
    if offloader:
        offloader.finish(progress)
    model.load_state_dict(state, strict=False, assign=True)
    del state

    if fresh:
        warnings.warn(f"{', '.join(fresh)} not in the checkpoint: newly initialised (train the head before use)",
                      stacklevel=3)
    _materialize_rest(model, dtype, device)
    model.tie_weights()
    if hasattr(model, "generation_config"):
        from ..generation.config import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    if tp * ep > 1 and quantization is not None:  # the sharding needs float weights: quantize the share after it
        from ..quantize import quantize

        scheme = quantization if isinstance(quantization, dict) else {"scheme": quantization}
        quantize(model, scheme["scheme"], scheme.get("group_size"), progress=progress)
    return model.eval()


def _offload_slots(model: torch.nn.Module, dtype: torch.dtype, device: torch.device, budget: int | None,
                   may_offload: bool, folder: Any, ranks: int) -> list[int] | None:
    """Expert slots of each layer when the weights must be offloaded to fit `budget` (None: they fit, or no
    budget)."""
    if budget is None:
        return None
    if not may_offload:
        check_fits(model, dtype, device, budget)
        return None
    from ..offload import plan_slots, slots_text

    slots = plan_slots(model, dtype, budget, model.config.num_experts_per_tok)
    if slots is not None and folder is None:
        raise CheckpointError(f"the weights do not fit max_memory (or the free memory) on {device}: pass "
                              "offload_folder=DIR to keep on disk the experts that do not "
                              f"({slots_text(slots)} a layer fit)")
    if slots is not None and ranks > 1:
        raise CheckpointError("offloading experts and tp/ep do not go together: give each rank the memory it needs")
    return slots


@torch.no_grad()
def _materialize_rest(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Give real storage to what the checkpoint did not fill: fresh head weights and derived buffers."""
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
            module.to(dtype)
            model.init_weights([module])
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(device, dtype)
