"""Weight-only quantization: `mixtral.quantize(model, "int8" | "int4")` on a loaded model, or while loading
(`from_pretrained(..., quantization="int4")`, through LoadQuantizer), so that the float model never exists whole.

Attention projections and expert weights are quantized, and an untied LM head in int8; the router, norms and
embeddings stay in floating point. The scheme is recorded in config.json ("quantization_config"), so save_pretrained /
from_pretrained round-trip a quantized model.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.attention import Attention
from ..model.moe import Experts
from .modules import SCHEMES, QuantizedEmbedding, QuantizedExperts, QuantizedLinear, _empty, _quantize

__all__ = ["quantize", "QuantizedLinear", "QuantizedExperts", "QuantizedEmbedding", "SCHEMES", "LoadQuantizer",
           "load_quantizer"]

# Rows of a weight quantized at once while loading: the float temporaries stay a few MB whatever the weight's size.
_BLOCK_ELEMENTS = 1 << 18


@torch.no_grad()
def quantize(model: nn.Module, scheme: str = "int8", group_size: int | None = None, symmetric: bool = False,
             progress: bool = True, lm_head: bool | str | dict = True,
             embed_tokens: bool | str | dict = False) -> nn.Module:
    """Replace attention and expert weights with int8 (per output channel, or per group of group_size columns: a
    multiple of 32, llama.cpp's Q8_0 in 32) or int4 (per group) versions, in place.

    int4 is asymmetric (a scale and a zero per group, fp16), or with symmetric=True llama.cpp's Q4_0: w = (q - 8) *
    scale, a scale per group and no zero (4.5 bits a weight in groups of 32 where asymmetric takes 5).

    lm_head=True also stores the causal LM's output layer in int8 (per row), whatever the scheme: it is the largest
    weight a token reads after the experts, and its errors go straight into the logits, so it keeps 8 bits (as
    llama.cpp keeps 6-8 for its output layer); a scheme (as `quantization=` takes them): in that one (a GGUF's Q8_0
    or Q4_0 output layer, as stored). An output layer tied to the embeddings stays in floating point.

    embed_tokens: the input embeddings in this scheme (a GGUF's Q4_0 or Q8_0 token_embd, as stored: the rows looked
    up are dequantized); False (the default) keeps them in floating point, as do tied embeddings.

    int4's group_size=None picks 128 columns where every input width allows it (the AVX-512 int4 kernel's
    fastest unit: one lookup table per 128 columns), else 32 (llama.cpp's block; the kernels take 32, 64 and
    multiples of 128, other sizes run a slower torch path). On a meta-device model this only swaps in empty
    quantized modules, which loading then fills.
    """
    config = model.config
    if config.extra.get("quantization_config"):
        raise ValueError(f"the model is already quantized ({config.extra['quantization_config']})")
    group_size = _group_size(config, scheme, group_size)
    symmetric = symmetric and scheme == "int4"
    modules = [m for m in model.modules() if isinstance(m, (Attention, Experts))]
    for module in tqdm(modules, desc=f"Quantizing to {scheme}", disable=not progress):
        if isinstance(module, Attention):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(module, name, QuantizedLinear(getattr(module, name), scheme, group_size, symmetric))
    for parent in list(model.modules()):
        experts = getattr(parent, "experts", None)
        if isinstance(experts, Experts) and not isinstance(experts, QuantizedExperts):
            parent.experts = QuantizedExperts(experts, scheme, group_size, symmetric)
    head = getattr(model, "lm_head", None)
    quantize_head = lm_head is not False and isinstance(head, nn.Linear) and not config.tie_word_embeddings
    if quantize_head:
        head_scheme = _side_scheme(config, lm_head)
        model.lm_head = QuantizedLinear(head, *head_scheme)
    embedding = next(((p, m) for p in model.modules() if isinstance(m := getattr(p, "embed_tokens", None),
                                                                      nn.Embedding)), None)
    quantize_embedding = embed_tokens not in (False, None) and embedding is not None and not config.tie_word_embeddings
    if quantize_embedding:
        embed_scheme = _side_scheme(config, embed_tokens)
        embedding[0].embed_tokens = QuantizedEmbedding(embedding[1], *embed_scheme)
    config.extra["quantization_config"] = {"quant_method": "mixtral", "scheme": scheme,
                                           **({"group_size": group_size} if group_size else {}),
                                           **({"symmetric": True} if symmetric else {}),
                                           **({"lm_head": _spec(*head_scheme)} if quantize_head else {}),
                                           **({"embed_tokens": _spec(*embed_scheme)} if quantize_embedding else {})}
    return model


def _side_scheme(config, spec: bool | str | dict) -> tuple[str, int | None, bool]:
    """(scheme, group size, symmetric) of the LM head or the embeddings: True is int8 per row."""
    scheme, group_size, symmetric = ("int8", None, False) if spec is True else _parse(spec)
    return scheme, _group_size(config, scheme, group_size), symmetric


def _spec(scheme: str, group_size: int | None, symmetric: bool) -> str | dict:
    """How config.json records a scheme: "int8" (per row), else {"scheme", "group_size"[, "symmetric"]}."""
    if group_size is None:
        return scheme
    return {"scheme": scheme, "group_size": group_size, **({"symmetric": True} if symmetric else {})}


def _group_size(config, scheme: str, group_size: int | None) -> int | None:
    """The group size quantize() uses: checked, or picked for group_size=None (see quantize; int8: None, per row)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: expected one of {SCHEMES}")
    widths = (config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_size)
    if group_size is None:
        return None if scheme == "int8" else 128 if all(k % 128 == 0 for k in widths) else 32
    if scheme == "int8" and group_size % 32:
        raise ValueError(f"int8 group_size={group_size} must be a multiple of 32")
    for k in widths:
        if k % group_size:
            raise ValueError(f"{scheme} group_size={group_size} must divide every input width; {k} is not a multiple")
    return group_size


def _parse(spec: str | dict) -> tuple[str, int | None, bool]:
    """(scheme, group_size, symmetric) from "int8" | "int4" or {"scheme": "int4", "group_size": 32, "symmetric":
    True} (config.json's form too)."""
    if isinstance(spec, str):
        scheme, group_size, symmetric = spec, None, False
    elif isinstance(spec, dict):
        unknown = set(spec) - {"scheme", "group_size", "symmetric", "quant_method", "lm_head", "embed_tokens"}
        if unknown or "scheme" not in spec or spec.get("quant_method", "mixtral") != "mixtral":
            raise ValueError(f"quantization={spec!r}: expected {{'scheme': one of {SCHEMES}, 'group_size': int, "
                             "'symmetric': bool}")
        scheme, group_size, symmetric = spec["scheme"], spec.get("group_size"), bool(spec.get("symmetric", False))
    else:
        raise TypeError(f"quantization must be a scheme name or a dict, got {type(spec).__name__}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: expected one of {SCHEMES}")
    return scheme, group_size, symmetric


class LoadQuantizer:
    """Quantizes weights as loading reads them: each float weight is quantized, then dropped, on arrival.

    Made on a meta-device float model, whose quantized modules it swaps in empty (quantize()'s meta path);
    `float_state` keeps the float model's names and shapes, which the checkpoint formats know how to read.
    """

    def __init__(self, model: nn.Module, scheme: str, group_size: int | None, symmetric: bool = False,
                 lm_head: bool | str | dict = True, embed_tokens: bool | str | dict = False) -> None:
        self.float_state = dict(model.state_dict(keep_vars=True))
        quantize(model, scheme, group_size, symmetric, progress=False, lm_head=lm_head, embed_tokens=embed_tokens)
        self._prefix: dict[str, str] = {}  # float weight name -> the name prefix of the buffers that replace it
        # float weight name -> (scheme, group size, symmetric): the module's
        self._scheme: dict[str, tuple[str, int, bool]] = {}
        for name in self.float_state.keys() - model.state_dict().keys():
            module_name = name.rpartition(".")[0]
            module = model.get_submodule(module_name)
            # QuantizedLinear's buffers replace its "weight": q_proj.qweight; QuantizedExperts prefixes the
            # weight's name: experts.gate_up_proj_qweight.
            linear = isinstance(module, (QuantizedLinear, QuantizedEmbedding))
            self._prefix[name] = f"{module_name}." if linear else f"{name}_"
            self._scheme[name] = module.scheme, module.group_size, module.symmetric

    def __contains__(self, name: str) -> bool:
        return name in self._prefix

    def scheme_of(self, name: str) -> tuple[str, int, bool]:
        """(scheme, group size, symmetric) of the buffers that replace float weight `name`."""
        return self._scheme[name]

    def buffer(self, name: str, part: str) -> str:
        """The state-dict name of one buffer ("packed", "scale", ...) that replaces float weight `name`."""
        return self._prefix[name] + part

    def empty(self, name: str, shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
        """The unfilled buffers that replace weight `name` of this shape, by state-dict name."""
        return {self._prefix[name] + part: t for part, t in _empty(shape, *self._scheme[name], device).items()}

    @torch.no_grad()
    def quantize_into(self, out: dict[str, torch.Tensor], name: str, w: torch.Tensor, index: tuple = ()) -> None:
        """Quantize w (..., N, K) into out[buffer][index] (out: empty(name, ...)), a block of rows at a time.

        Both schemes quantize each row on its own, so this equals quantizing the whole weight at once, bit for bit.
        out[buffer][index] must be a contiguous block of rows (the view below fails loudly otherwise)."""
        w_MK = w.flatten(0, -2)  # M = all rows
        dest_M = {key: t[index].view(-1, *t[index].shape[w.dim() - 1:]) for key, t in out.items()}  # (M,) or (M, X)
        rows = max(1, _BLOCK_ELEMENTS // w.shape[-1])
        for r in range(0, w_MK.shape[0], rows):
            for part, t in _quantize(w_MK[r:r + rows], *self._scheme[name]).items():
                dest_M[self._prefix[name] + part][r:r + rows].copy_(t)


def load_quantizer(model: nn.Module, requested: str | dict | None, saved: dict | None,
                   lm_head: bool | str | dict = True, embed_tokens: bool | str | dict = False) -> LoadQuantizer | None:
    """Prepare a meta-device model for loading: swap in the empty quantized modules of the checkpoint's scheme
    (`saved`, config.json's quantization_config), or of `requested` (lm_head, embed_tokens: as quantize's), returning
    the LoadQuantizer that then quantizes each weight as it is read. A request that disagrees with the checkpoint's
    scheme is an error."""
    want = None if requested is None else _parse(requested)
    if saved:
        have = (saved["scheme"], saved.get("group_size"), bool(saved.get("symmetric", False)))
        if want is not None and (want[0] != have[0] or want[1] not in (None, have[1])):
            raise ValueError(f"the checkpoint is already quantized ({saved}); it cannot be loaded with "
                             f"quantization={requested!r} (leave quantization out, or ask for the same scheme)")
        quantize(model, *have, progress=False, lm_head=saved.get("lm_head", False),
                 embed_tokens=saved.get("embed_tokens", False))
        return None
    return None if want is None else LoadQuantizer(model, *want, lm_head=lm_head, embed_tokens=embed_tokens)
