"""GGUF, llama.cpp's single-file format: read Llama and Mixtral files, write Mixtral the way llama.cpp loads it.

llama.cpp's names: token_embd, blk.N.attn_q/attn_k/attn_v/attn_output, attn_norm, ffn_norm, the router
ffn_gate_inp, stacked experts ffn_gate_exps/ffn_up_exps/ffn_down_exps (older Mixtral files: ffn_gate.E etc.,
one tensor per expert; a dense Llama: ffn_gate/ffn_up/ffn_down), output_norm, output (absent when tied).

Three conventions differ from ours:
- GGUF lists dimensions innermost first: GGUF shape [H, I, E] is our (E, I, H).
- llama.cpp's converter permutes q/k rows from rotate-half to interleaved RoPE pairs; we undo it on read and
  redo it on write.
- A dense Llama is read as a Mixtral with one expert, top-1, and a zero router: softmax over one expert is
  exactly 1, so the MoE block computes the dense MLP, bit for bit. Writing a one-expert model gives a dense file.
"""

from __future__ import annotations

import mmap
import os
import re
from collections import Counter
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

import gguf
from gguf import GGMLQuantizationType as QT

from ..config import MixtralConfig
from .gguf_tokenizer import add_tokenizer_metadata, tokenizer_from_metadata, write_tokenizer_files
from .source import CheckpointError
from .transforms import Part, Recipe, half_to_interleaved, interleaved_to_half, stacked_experts

__all__ = ["open_gguf", "save_gguf", "read_gguf_tokenizer", "write_tokenizer_files", "GGUFSource"]

ARCHITECTURES = ("llama", "mixtral")  # llama.cpp loads Mixtral as "llama" + expert_count; "mixtral" is read alike
# Types we read: float ones as they are, quantized ones through gguf.quants.dequantize (to fp32).
_FLOAT_TYPES = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
_QUANT_TYPES = (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)
_FOUR_BIT_CODES = (QT.Q2_K, QT.Q3_K, QT.Q4_0, QT.Q4_1, QT.Q4_K)  # re-quantized to int4 by default, the rest to int8

_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER = {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
          "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
          "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
          "mlp.gate.weight": "ffn_gate_inp"}
_FFN = {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}  # Mixtral's expert matrices -> llama.cpp's names
# the matrices that quantize() stores in int4: attention's, and the experts' (stacked, per expert, or a dense MLP)
_INT4_MATRIX = re.compile(r"blk\.\d+\.(attn_[qkv]|attn_output|ffn_(gate|up|down)(_exps)?(\.\d+)?)\.weight")


# ---- reading -------------------------------------------------------------------------------------------------
def _open_reader(path: str) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError... on a bad or truncated file
        raise CheckpointError(f"{path} is not a readable GGUF file (wrong format, truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None


def _meta(reader: gguf.GGUFReader, key: str, default: Any = KeyError) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is KeyError:
            raise CheckpointError(f"{reader.data.filename}: the GGUF metadata lacks {key!r}")
        return default
    return field.contents()


class GGUFSource:
    """A GGUF file's tensors in PyTorch's dimension order; quantized ones are dequantized to fp32 when loaded.

    Dense layers also get a virtual router, `blk.N.ffn_gate_inp.weight` = zeros (1, H), so that a dense file
    reads as a one-expert Mixtral.
    """

    def __init__(self, reader: gguf.GGUFReader, path: str, progress: bool = False) -> None:
        self.path = path
        self.files = [path]
        self.tensors = {t.name: t for t in reader.tensors}
        self._map: mmap.mmap | None = getattr(reader.data, "_mmap", None)  # numpy's memmap of the whole file
        bad = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors
               if t.tensor_type not in _FLOAT_TYPES and t.tensor_type not in _QUANT_TYPES]
        if bad:
            supported = ", ".join(t.name for t in (*_FLOAT_TYPES, *_QUANT_TYPES))
            raise CheckpointError(f"{path}: unsupported GGUF tensor type(s): {', '.join(bad[:4])}"
                                  + (" ..." if len(bad) > 4 else "") + f"; supported: {supported}")
        self.virtual: dict[str, torch.Tensor] = {}
        for name in self.tensors:
            if (m := re.fullmatch(r"blk\.(\d+)\.ffn_gate\.weight", name)):
                router = f"blk.{m.group(1)}.ffn_gate_inp.weight"
                if router not in self.tensors:
                    self.virtual[router] = torch.zeros(1, self.shape(name)[1])  # (E=1, H)
        self._progress, self._bar = progress, None

    def keys(self) -> list[str]:
        return [*self.tensors, *self.virtual]

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.virtual:
            return tuple(self.virtual[key].shape)
        return tuple(int(d) for d in reversed(self.tensors[key].shape.tolist()))

    def dtype(self, key: str) -> torch.dtype:
        if key in self.virtual:
            return self.virtual[key].dtype
        return _FLOAT_TYPES.get(self.tensors[key].tensor_type, torch.float32)

    def load(self, key: str) -> torch.Tensor:
        if key in self.virtual:
            return self.virtual[key]
        t = self.tensors[key]
        try:
            if t.tensor_type == QT.BF16:  # stored as raw bytes; reinterpret, do not convert
                out = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16)
            elif t.tensor_type in _FLOAT_TYPES:
                out = torch.from_numpy(np.array(t.data))  # a copy: the memory map is read-only
            else:
                out = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
            out = out.reshape(self.shape(key))
        except (ValueError, IndexError, OSError) as e:
            raise CheckpointError(f"cannot read {key!r} ({t.tensor_type.name}) from {self.path}: {e}") from None
        self._done(key)
        return out

    def is_q4_0(self, key: str) -> bool:
        return self._is(key, QT.Q4_0)

    def is_q8_0(self, key: str) -> bool:
        return self._is(key, QT.Q8_0)

    def _is(self, key: str, kind: Any) -> bool:
        t = self.tensors.get(key)
        return t is not None and t.tensor_type == kind

    def stores_q4_0(self) -> bool:
        """Whether every matrix that int4 quantization covers (attention, experts or the dense MLP) is Q4_0 here."""
        return self._stores(QT.Q4_0)

    def stores_q8_0(self) -> bool:
        """Whether every matrix that quantization covers is Q8_0 here."""
        return self._stores(QT.Q8_0)

    def _stores(self, kind: Any) -> bool:
        matrices = self._int4_matrices()
        return bool(matrices) and all(t.tensor_type == kind for t in matrices)

    def nearest_scheme(self) -> dict[str, Any] | None:
        """The quantization that keeps this file's matrices (attention, experts) nearest to how it stores them, when
        they are all quantized: int4 in groups of 32 where most of their weights have codes of 4 bits or fewer
        (Q2_K, Q3_K, Q4_0, Q4_1, Q4_K), symmetric where all are Q4_0 (its blocks taken as they are, 4.5 bits a
        weight), else int8 in groups of 32 (Q5_*, Q6_K, Q8_0: Q8_0's blocks taken as they are, 8.5 bits a weight);
        None for a file whose matrices are floats, or partly."""
        matrices = self._int4_matrices()
        if not matrices or any(t.tensor_type in _FLOAT_TYPES for t in matrices):
            return None
        low = sum(int(t.n_elements) for t in matrices if t.tensor_type in _FOUR_BIT_CODES)
        if low * 2 >= sum(int(t.n_elements) for t in matrices):
            return {"scheme": "int4", "group_size": 32, **({"symmetric": True} if self.stores_q4_0() else {})}
        return {"scheme": "int8", "group_size": 32}

    def stored_scheme(self, key: str) -> dict[str, Any] | bool:
        """The scheme that holds tensor `key` as stored (Q8_0: int8 in groups of 32, Q4_0: symmetric int4), else
        False (floating point): how loading keeps the output layer and the token embeddings."""
        if self.is_q8_0(key):
            return {"scheme": "int8", "group_size": 32}
        return {"scheme": "int4", "group_size": 32, "symmetric": True} if self.is_q4_0(key) else False

    def _int4_matrices(self) -> list[Any]:
        return [t for name, t in self.tensors.items() if _INT4_MATRIX.fullmatch(name)]

    def load_q4_0(self, key: str) -> dict[str, torch.Tensor]:
        """A Q4_0 tensor (..., N, K) as our symmetric int4 buffers with groups of 32 (mixtral.kernels' layout),
        "packed" and "scales": the same numbers, and never a float copy. A Q4_0 block is an fp16 scale d and 16 bytes
        whose low nibbles are its values 0-15 and high nibbles 16-31, w = d (q - 8)."""
        *lead, n, k = self.shape(key)
        packed = torch.empty(int(np.prod(lead, dtype=np.int64)) * n, k // 2, dtype=torch.uint8)

        def pack(qs: torch.Tensor) -> torch.Tensor:  # (R, G, 16) -> (R, K / 2)
            q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(-1, k)  # (R, K): values in column order
            return q[:, 0::2] | q[:, 1::2] << 4

        scales = self._blocks(key, "Q4_0", 18, packed, pack)
        return {"packed": packed.reshape(*lead, n, k // 2), "scales": scales.reshape(*lead, n, k // 32)}

    def load_q8_0(self, key: str) -> dict[str, torch.Tensor]:
        """A Q8_0 tensor (..., N, K) as our int8 buffers in groups of 32, "qweight" and "scale": the same numbers, and
        never a float copy. A Q8_0 block is an fp16 scale d and 32 int8 codes q, w = d q."""
        *lead, n, k = self.shape(key)
        qweight = torch.empty(int(np.prod(lead, dtype=np.int64)) * n, k, dtype=torch.int8)
        scale = self._blocks(key, "Q8_0", 34, qweight, lambda qs: qs.contiguous().view(torch.int8).reshape(-1, k))
        return {"qweight": qweight.reshape(*lead, n, k), "scale": scale.reshape(*lead, n, k // 32)}

    def _blocks(self, key: str, kind: str, block_bytes: int, codes: torch.Tensor,
                unpack: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Read tensor `key` (..., N, K) of `kind`, blocks of 32 weights of block_bytes each (an fp16 scale, then the
        codes), a few MB of rows at a time: codes (rows, ...) gets unpack(code bytes (R, G, block_bytes - 2)); returns
        the scales (rows, K / 32) in fp16."""
        t = self.tensors[key]
        *lead, n, k = self.shape(key)
        rows, groups = int(np.prod(lead, dtype=np.int64)) * n, k // 32
        scales = torch.empty(rows, groups, dtype=torch.float16)
        try:
            blocks = np.asarray(t.data).reshape(rows, groups, block_bytes)
            step = max(1, (1 << 22) // k)  # rows a chunk: a few MB of temporaries at a time
            for r in range(0, rows, step):
                chunk = torch.from_numpy(np.array(blocks[r:r + step]))  # (R, G, B) uint8, copied off the read-only map
                scales[r:r + step] = chunk[..., :2].contiguous().view(torch.float16)[..., 0]
                codes[r:r + step] = unpack(chunk[..., 2:])
        except (ValueError, IndexError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {key!r} ({kind}) from {self.path}: {e}") from None
        self._done(key)
        return scales

    def _done(self, key: str) -> None:
        """After reading `key`: drop its file pages from this process (they stay in the page cache), so that the
        mapped file does not add up in RSS beside the weights made from it; then the progress bar."""
        t = self.tensors[key]
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            start = int(t.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
            try:
                self._map.madvise(mmap.MADV_DONTNEED, start, int(t.data_offset) + int(t.n_bytes) - start)
            except (OSError, ValueError):
                pass  # only memory is at stake
        if self._bar is None:  # made on first use, so that a file refused before loading shows no bar
            self._bar = tqdm(total=len(self.tensors), desc="Reading GGUF", unit="tensor", disable=not self._progress)
        self._bar.update()
        if self._bar.n >= self._bar.total:
            self._bar.close()


def config_from_gguf(reader: gguf.GGUFReader, path: str, **overrides: Any) -> MixtralConfig:
    """A MixtralConfig from a Llama/Mixtral GGUF's metadata (a dense Llama: one expert, top-1)."""
    arch = _meta(reader, "general.architecture", None)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (expected one of {ARCHITECTURES})")
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{path}: the GGUF has no token_embd.weight")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab_size, hidden = int(embd.shape[1]), int(embd.shape[0])  # GGUF order: [H, V]

    def meta(key: str, default: Any = KeyError) -> Any:
        return _meta(reader, f"{arch}.{key}", default)

    scaling = meta("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise CheckpointError(f"{path}: RoPE scaling {scaling!r} is not supported (Mixtral uses plain RoPE)")
    if "rope_freqs.weight" in names:
        raise CheckpointError(f"{path}: the GGUF has rope_freqs.weight (Llama 3.1-style RoPE scaling), "
                              "which Mixtral does not support")
    heads = int(meta("attention.head_count"))
    key_length = meta("attention.key_length", None)
    head_size = int(key_length) if key_length is not None else hidden // heads
    if meta("attention.value_length", head_size) != head_size:
        raise CheckpointError(f"{path}: attention.value_length differs from key_length, which Mixtral does not allow")
    if meta("rope.dimension_count", head_size) != head_size:
        raise CheckpointError(f"{path}: RoPE rotates {meta('rope.dimension_count')} of {head_size} head dimensions; "
                              "Mixtral rotates them all")
    experts = int(meta("expert_count", 0) or 0)

    def token_id(kind: str) -> int | None:
        value = _meta(reader, f"tokenizer.ggml.{kind}_token_id", None)
        return int(value) if value is not None else None

    fields = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=int(key_length) if key_length is not None else None,
        rms_norm_eps=_float32(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_float32(meta("rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta("context_length", 4096)),
        num_local_experts=max(experts, 1), num_experts_per_tok=int(meta("expert_used_count", 1)) if experts else 1,
        tie_word_embeddings="output.weight" not in names, sliding_window=None,
        bos_token_id=token_id("bos"), eos_token_id=token_id("eos"), pad_token_id=token_id("padding"),
        dtype=_file_dtype(reader),
    )
    try:
        return MixtralConfig(**{**fields, **overrides})
    except ValueError as e:
        raise CheckpointError(f"{path}: the GGUF metadata describes no valid Mixtral: {e}") from None


def _float32(value: float) -> float:
    """A float32 metadata value as its shortest decimal: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(value)))


def _file_dtype(reader: gguf.GGUFReader) -> str:
    """What the weights are: float16/bfloat16 for such files; float32 for fp32 and quantized ones (dequantized)."""
    kinds = Counter(t.tensor_type for t in reader.tensors if len(t.shape) > 1)
    kind = kinds.most_common(1)[0][0] if kinds else QT.F32
    return {QT.F16: "float16", QT.BF16: "bfloat16"}.get(kind, "float32")


def gguf_recipes(keys: list[str], source_keys: set[str], config: MixtralConfig) -> dict[str, Recipe]:
    """How each of our parameters (named as in MixtralForCausalLM) is read from a GGUF."""
    nh, nkv, i = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    recipes = {}
    for key in keys:
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if key in _TOP:
            recipes[key] = Recipe.copy(_TOP[key])
        elif m and m.group(2) in _LAYER:
            n = {"self_attn.q_proj.weight": nh, "self_attn.k_proj.weight": nkv}.get(m.group(2))
            transform = (lambda w, n=n: interleaved_to_half(w, n)) if n else None
            recipes[key] = Recipe.copy(f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.weight", transform)
        elif m and m.group(2) in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            blk, name = f"blk.{m.group(1)}", m.group(2).rsplit(".", 1)[1]
            if f"{blk}.ffn_gate_exps.weight" in source_keys:  # stacked: (E, I, H) each
                recipes[key] = (Recipe([Part(f"{blk}.ffn_gate_exps.weight", (slice(None), slice(0, i))),
                                        Part(f"{blk}.ffn_up_exps.weight", (slice(None), slice(i, 2 * i)))])
                                if name == "gate_up_proj" else Recipe.copy(f"{blk}.ffn_down_exps.weight"))
            else:  # one tensor per expert (older Mixtral files), or the dense MLP as the only expert
                per_expert = f"{blk}.ffn_gate.0.weight" in source_keys
                rows = 2 * i if name == "gate_up_proj" else config.hidden_size

                def key_of(e: int, w: str, blk: str = blk, per_expert: bool = per_expert) -> str:
                    return f"{blk}.{_FFN[w]}.{e}.weight" if per_expert else f"{blk}.{_FFN[w]}.weight"

                recipes[key] = stacked_experts(key_of, name, config.num_local_experts, rows)
        else:
            recipes[key] = Recipe.copy(key)  # nothing else lives in a GGUF: reported as missing
    return recipes


def read_gguf_tokenizer(path: str | os.PathLike) -> dict[str, Any]:
    """The tokenizer a GGUF carries: model ("gpt2" | "llama"), pre, tokens, token_types, scores, merges,
    bos/eos/unk/pad_token_id, add_bos_token, add_eos_token, add_space_prefix, chat_template (None when absent)."""
    path = os.fspath(path)
    return tokenizer_from_metadata(_open_reader(path), path)


def open_gguf(path: str, progress: bool = True, **config_overrides: Any) -> tuple[MixtralConfig, GGUFSource, Any]:
    """(config, source, recipe plan) for from_pretrained on a .gguf file."""
    reader = _open_reader(path)
    config = config_from_gguf(reader, path, **config_overrides)
    return config, GGUFSource(reader, path, progress=progress), gguf_recipes


# ---- writing -------------------------------------------------------------------------------------------------
_WRITE_TYPES = {"f32": (QT.F32, gguf.LlamaFileType.ALL_F32), "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
                "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
                "q4_0": (QT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}


def _gguf_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(llama.cpp name, tensor in our dimension order, keep in F32?) for each tensor of the file."""
    cfg: MixtralConfig = model.config
    dense = cfg.num_local_experts == 1  # the router of one expert has no effect: write a plain Llama FFN
    i = cfg.intermediate_size
    for key, w in model.state_dict().items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if key in _TOP:
            if not (key == "lm_head.weight" and cfg.tie_word_embeddings):
                yield _TOP[key], w, w.dim() == 1
        elif m and m.group(2) == "mlp.gate.weight":
            if not dense:
                yield f"blk.{m.group(1)}.ffn_gate_inp.weight", w, True  # routing is sensitive: llama.cpp keeps F32
        elif m and m.group(2) in _LAYER:
            n = {"self_attn.q_proj.weight": cfg.num_attention_heads,
                 "self_attn.k_proj.weight": cfg.num_key_value_heads}.get(m.group(2))
            yield f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.weight", half_to_interleaved(w, n) if n else w, w.dim() == 1
        elif m and m.group(2) == "mlp.experts.gate_up_proj":  # (E, 2I, H) = [w1; w3]
            blk, sfx = f"blk.{m.group(1)}", "" if dense else "_exps"
            yield f"{blk}.ffn_gate{sfx}.weight", w[0, :i] if dense else w[:, :i], False
            yield f"{blk}.ffn_up{sfx}.weight", w[0, i:] if dense else w[:, i:], False
        elif m and m.group(2) == "mlp.experts.down_proj":  # (E, H, I)
            yield f"blk.{m.group(1)}.ffn_down{'' if dense else '_exps'}.weight", w[0] if dense else w, False
        else:
            raise CheckpointError(f"{key} has no place in a GGUF (only MixtralForCausalLM can be saved so)")


def _encode(w: torch.Tensor, kind: QT) -> np.ndarray:
    """The bytes (or float array) llama.cpp reads for a tensor of this type."""
    a = w.detach().to("cpu", torch.float32).contiguous().numpy()
    if kind == QT.F32:
        return a
    if kind == QT.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, kind)  # BF16 (round to nearest even), Q8_0 or Q4_0 blocks, as uint8


def save_gguf(model: torch.nn.Module, path: str | os.PathLike, dtype: str = "f32",
              tokenizer_data: dict | None = None, progress: bool = True) -> None:
    """Write a MixtralForCausalLM as a llama.cpp GGUF (arch "llama", stacked experts), tensor by tensor.

    dtype: f32 | f16 | bf16 | q8_0 | q4_0 for the matrices; norms and the router stay F32 (as llama.cpp's converter
    does), and with q4_0 an untied output layer keeps Q8_0 (its errors go straight into the logits; llama.cpp's
    quantizer keeps it at 6 bits, mixtral.quantize at 8). tokenizer_data: read_gguf_tokenizer's dict, stored as
    tokenizer.* metadata.
    """
    path = os.fspath(path)
    if dtype not in _WRITE_TYPES:
        raise ValueError(f"dtype must be one of {sorted(_WRITE_TYPES)}, got {dtype!r}")
    kind, file_type = _WRITE_TYPES[dtype]
    cfg: MixtralConfig = model.config
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        import warnings
        warnings.warn(f"GGUF (arch llama) has no sliding window: llama.cpp will attend to the whole context, "
                      f"not the last {cfg.sliding_window} tokens", stacklevel=2)

    def tensor_type(name: str, w: torch.Tensor, keep_f32: bool) -> QT:
        if keep_f32:
            return QT.F32
        if kind in (QT.Q8_0, QT.Q4_0) and w.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
            return QT.F16  # rows must be whole 32-value blocks; llama.cpp's converter falls back the same way
        return QT.Q8_0 if kind == QT.Q4_0 and name == "output.weight" else kind

    writer = gguf_writer(path, cfg, file_type, tokenizer_data)
    # Tensor infos first, then the data one tensor at a time: the file never sits in memory whole.
    items = list(_gguf_items(model))
    types = [tensor_type(name, w, keep) for name, w, keep in items]
    for (name, w, _), t in zip(items, types):
        block, size = gguf.GGML_QUANT_SIZES[t]
        writer.add_tensor_info(name, tuple(w.shape), np.dtype(np.float32), w.numel() // block * size, raw_dtype=t)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (name, w, _), t in tqdm(list(zip(items, types)), desc="Writing GGUF", unit="tensor",
                                    disable=not progress):
            writer.write_tensor_data(_encode(w, t))
    finally:
        writer.close()


def gguf_writer(path: str, cfg: MixtralConfig, file_type: gguf.LlamaFileType,
                tokenizer_data: dict | None = None) -> gguf.GGUFWriter:
    """A GGUFWriter (arch "llama") holding the metadata of a model of this config; its tensors are the caller's."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("mixtral" if cfg.num_local_experts > 1 else "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.head_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    if cfg.head_dim is not None:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.num_local_experts > 1:
        writer.add_expert_count(cfg.num_local_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer_data is not None:
        add_tokenizer_metadata(writer, tokenizer_data)
    else:  # llama.cpp refuses a file without tokenizer.ggml.model; "none" is its marker for "no vocabulary"
        writer.add_tokenizer_model("none")
        for kind_, value in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id), ("pad", cfg.pad_token_id)):
            if isinstance(value, int):
                getattr(writer, f"add_{kind_}_token_id")(value)
    return writer
