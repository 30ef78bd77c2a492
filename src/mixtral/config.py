"""MixtralConfig: Transformers' field names and defaults, read from config.json or Mistral's params.json."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

CONFIG_NAME = "config.json"

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")
_PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn 'bfloat16', 'torch.float16' or a torch.dtype into a torch.dtype, with a clear error otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}: expected one of {sorted(set(_DTYPES))} or a torch.dtype")
    return _DTYPES[name]


@dataclass
class MixtralConfig:
    """The Mixtral architecture. Field names and defaults are Transformers' (Mixtral-8x7B)."""

    vocab_size: int = 32000  # tokens in the embedding table and the LM head
    hidden_size: int = 4096  # model width H
    intermediate_size: int = 14336  # width I of each expert's SiLU-gated MLP
    num_hidden_layers: int = 32  # decoder layers
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int | None = 8  # key/value heads (GQA); None means as many as query heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"  # expert activation
    max_position_embeddings: int = 4096 * 32  # longest context the model accepts
    initializer_range: float = 0.02  # std of the normal init of fresh weights
    rms_norm_eps: float = 1e-5
    use_cache: bool = True  # return a KV cache from forward by default
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    rope_theta: float = 1e6  # RoPE base; also read from Transformers 5's rope_parameters
    sliding_window: int | None = None  # a query sees the last `sliding_window` keys, itself included
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 2  # top-k experts per token
    num_local_experts: int = 8  # experts E per layer
    output_router_logits: bool = False  # default for forward(output_router_logits=...)
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss added to the LM loss
    router_jitter_noise: float = 0.0  # multiplicative uniform noise on the MoE input, training only
    id2label: dict[int, str] | None = None  # classification heads' labels; num_labels = len(id2label)
    label2id: dict[str, int] | None = None
    problem_type: str | None = None  # regression | single_label_classification | multi_label_classification
    dtype: str | None = None  # dtype the weights were saved in ("torch_dtype" in older files)
    # Fields this class does not know, kept so that a config.json round trip loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __init__(self, num_labels: int | None = None, torch_dtype: Any = None, **kwargs: Any) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        extra = dict(kwargs.pop("extra", None) or {})
        if "num_experts" in kwargs:  # Transformers' attribute_map alias
            kwargs.setdefault("num_local_experts", kwargs.pop("num_experts"))
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, f.name, kwargs.pop(f.name, default))
        rope = kwargs.pop("rope_parameters", None) or kwargs.pop("rope_scaling", None)
        if rope is not None:
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise ValueError(f"rope_type {rope_type!r} is not supported: Mixtral uses the default RoPE")
            self.rope_theta = rope.get("rope_theta", self.rope_theta)
        if torch_dtype is not None and self.dtype is None:
            self.dtype = str(torch_dtype).removeprefix("torch.")
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).removeprefix("torch.")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            if num_labels is not None and num_labels != len(self.id2label):
                raise ValueError(f"num_labels={num_labels} does not match id2label, which has {len(self.id2label)} labels")
        else:
            self.num_labels = 2 if num_labels is None else num_labels
        extra.update(kwargs)
        self.extra = {k: v for k, v in extra.items() if k not in names}
        self._attn_implementation = "sdpa"
        self.validate()

    # Transformers keeps num_labels as a view of id2label; so do we.
    @property
    def num_labels(self) -> int:
        return len(self.id2label) if self.id2label is not None else 0

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"num_labels must be >= 1, got {n}")
        self.id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    @property
    def head_size(self) -> int:
        """Per-head width: head_dim, or hidden_size // num_attention_heads when head_dim is None."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return parse_dtype(self.dtype) if self.dtype else None

    def __getattr__(self, name: str) -> Any:
        # Unknown config.json fields (e.g. classifier_dropout) read like attributes, as in Transformers.
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"MixtralConfig has no field {name!r}")

    def validate(self) -> None:
        """Reject configs that cannot describe a working model, naming the field."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "num_local_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
            raise ValueError(f"head_dim must be a positive integer or None, got {self.head_dim!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                             f"({self.num_attention_heads}); set head_dim explicitly")
        if self.head_size % 2:
            raise ValueError(f"the head size must be even for RoPE, got {self.head_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed "
                             f"num_local_experts ({self.num_local_experts})")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported: expected one of {_ACTIVATIONS}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("rms_norm_eps and rope_theta must be positive")
        if not 0.0 <= self.attention_dropout < 1.0 or self.router_jitter_noise < 0:
            raise ValueError("attention_dropout must be in [0, 1) and router_jitter_noise >= 0")
        if self.problem_type is not None and self.problem_type not in _PROBLEM_TYPES:
            raise ValueError(f"problem_type {self.problem_type!r} is not one of {_PROBLEM_TYPES}")
        if self.dtype is not None:
            parse_dtype(self.dtype)

    # ---- serialisation -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "MixtralConfig":
        """Build from a config.json dict (Transformers 4.x or 5.x style); unknown fields are kept."""
        data = {**copy.deepcopy(data), **overrides}
        model_type = data.pop("model_type", "mixtral")
        if model_type != "mixtral":
            raise ValueError(f"config describes a {model_type!r} model, not a Mixtral (model_type must be 'mixtral')")
        for key in ("transformers_version", "_name_or_path"):
            data.pop(key, None)
        return cls(**data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "MixtralConfig":
        """Read config.json (or Mistral's params.json) from a folder, or a config file directly."""
        path = os.fspath(path)
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, CONFIG_NAME)):
                path = os.path.join(path, CONFIG_NAME)
            elif os.path.isfile(os.path.join(path, "params.json")):
                from .checkpoint.mistral import config_from_params
                return config_from_params(os.path.join(path, "params.json"), **overrides)
            else:
                raise FileNotFoundError(f"{path} has no config.json (nor Mistral's params.json)")
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"No such config file or model folder: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(data, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that Transformers 4.x and 5.x both read."""
        out: dict[str, Any] = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        out["torch_dtype"] = out["dtype"]
        out.update(copy.deepcopy(self.extra))
        if out.get("id2label") is not None:
            out["id2label"] = {str(k): v for k, v in out["id2label"].items()}
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config.json into a folder (created if missing)."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MixtralConfig) and self.to_dict() == other.to_dict()
