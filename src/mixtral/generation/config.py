"""GenerationConfig: generate()'s defaults, read from a checkpoint's generation_config.json when present."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

GENERATION_CONFIG_NAME = "generation_config.json"


@dataclass
class GenerationConfig:
    max_new_tokens: int | None = None  # new tokens to produce; wins over max_length
    max_length: int = 20  # prompt + new tokens, Transformers' default when neither is given
    do_sample: bool = False  # greedy unless asked
    temperature: float = 1.0
    top_k: int = 50  # Transformers' default, applied only when sampling
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names and v is not None})

    @classmethod
    def from_pretrained(cls, folder: str) -> "GenerationConfig | None":
        """The folder's generation_config.json, or None when it has none."""
        path = os.path.join(folder, GENERATION_CONFIG_NAME)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path} is not a valid generation config: {e}") from None

    def update(self, **kwargs: Any) -> "GenerationConfig":
        """A copy with the given values replaced; as in Transformers, an explicit None replaces too
        (eos_token_id=None: no end-of-sequence token) and a None knob means its neutral value."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
        out = dataclasses.replace(self, **kwargs)
        neutral = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                   "repetition_penalty": 1.0, "num_return_sequences": 1}
        return dataclasses.replace(out, **{k: v for k, v in neutral.items() if getattr(out, k) is None})

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, GENERATION_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in dataclasses.asdict(self).items() if v is not None}, f, indent=2)
