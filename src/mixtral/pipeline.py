"""pipeline("text-generation"): strings or chat messages in, Transformers-shaped dicts out."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

Message = dict[str, str]


def _is_chat(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) and "role" in m for m in x)


def load_model_and_tokenizer(model: str | os.PathLike | None, dtype: str | torch.dtype = "auto",
                             device: str | None = None, progress: bool = True, quantize: str | None = None,
                             tp: int = 1, ep: int = 1, lora: str | os.PathLike | None = None, **load_kwargs: Any):
    """(model, tokenizer) from a checkpoint folder or .gguf file; None means the built-in demo model.
    quantize="int8" | "int4" quantizes each weight as it is loaded (from_pretrained's quantization=); tp / ep:
    this rank's share of a tensor / expert parallel model (under torchrun); lora: a PEFT adapter folder to run with
    (mixtral.lora.use_adapter); load_kwargs: from_pretrained's others (device_map, max_memory, load_in_4bit, ...)."""
    from .model import MixtralForCausalLM
    from .tokenizer import MixtralTokenizer

    if model is None:
        from .demo import demo_model_path

        model = demo_model_path()
    path = os.fspath(model)
    if lora is not None and tp * ep > 1:
        raise ValueError("a LoRA adapter with --tp/--ep is not supported: merge it into the checkpoint first "
                         "(mixtral.lora.merge_and_unload, then save_pretrained)")
    lm = MixtralForCausalLM.from_pretrained(path, dtype=dtype, device=device, progress=progress,
                                            quantization=quantize or None, tp=tp, ep=ep, **load_kwargs)
    if lora is not None:
        from .lora import use_adapter

        use_adapter(lm, lora)
    if path.endswith(".gguf"):  # the tokenizer rides in the GGUF's metadata: rebuild its files, then load them
        from .checkpoint.gguf import read_gguf_tokenizer, write_tokenizer_files

        with tempfile.TemporaryDirectory() as folder:
            write_tokenizer_files(read_gguf_tokenizer(path), folder)
            return lm, MixtralTokenizer.from_pretrained(folder)
    return lm, MixtralTokenizer.from_pretrained(path)


class TextGenerationPipeline:
    """Calls model.generate on one prompt, a list of prompts, or chat conversations (batched, left-padded)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, inputs: str | list[str] | list[Message] | list[list[Message]], *,
                 return_full_text: bool = True, **generate_kwargs: Any) -> list:
        single = isinstance(inputs, str) or _is_chat(inputs)
        items = [inputs] if single else list(inputs)
        if not items:
            raise ValueError("no inputs given")
        tok = self.tokenizer
        prompts: list[list[int]] = []
        for item in items:
            if _is_chat(item):
                prompts.append(tok.apply_chat_template(item, add_generation_prompt=True, tokenize=True))
            elif isinstance(item, str):
                prompts.append(tok.encode(item))
            else:
                raise TypeError(f"expected a string or a list of {{'role', 'content'}} messages, got {item!r:.80}")
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        generate_kwargs.setdefault("pad_token_id", pad)
        if generate_kwargs.get("eos_token_id") is None and tok.eos_token_id is not None:
            generate_kwargs.setdefault("eos_token_id", self._eos_default())
        n = generate_kwargs.get("num_return_sequences", 1) or 1
        out = self.model.generate(ids, attention_mask=mask, **generate_kwargs)

        results = []
        for i, item in enumerate(items):
            rows = []
            for j in range(n):
                reply = tok.decode(out[i * n + j, width:].tolist(), skip_special_tokens=True)
                if _is_chat(item):
                    text: Any = item + [{"role": "assistant", "content": reply}] if return_full_text else reply
                else:
                    text = item + reply if return_full_text else reply
                rows.append({"generated_text": text})
            results.append(rows)
        return results[0] if single else results

    def _eos_default(self) -> int | list[int]:
        cfg = getattr(self.model, "generation_config", None)
        if cfg is not None and cfg.eos_token_id is not None:
            return cfg.eos_token_id
        return self.tokenizer.eos_token_id


def pipeline(task: str = "text-generation", model: Any = None, tokenizer: Any = None,
             dtype: str | torch.dtype = "auto", device: str | None = None, quantize: str | None = None,
             device_map: Any = None, model_kwargs: dict[str, Any] | None = None) -> TextGenerationPipeline:
    """Transformers' pipeline() for text generation; model=None uses the built-in demo model. device_map and
    model_kwargs go to from_pretrained, as in Transformers."""
    if task != "text-generation":
        raise ValueError(f"unsupported task {task!r}: mixtral's pipeline does 'text-generation'")
    if model is None or isinstance(model, (str, os.PathLike)):
        lm, tok = load_model_and_tokenizer(model, dtype=dtype, device=device, quantize=quantize,
                                           **({} if device_map is None else {"device_map": device_map}),
                                           **(model_kwargs or {}))
        return TextGenerationPipeline(lm, tokenizer or tok)
    if tokenizer is None:
        raise ValueError("pass tokenizer= along with a model object (or pass the model's path)")
    if quantize is not None or device_map is not None or model_kwargs:
        raise ValueError("quantize, device_map and model_kwargs apply when the pipeline loads the model: pass its "
                         "path, or quantize and place the model object yourself")
    return TextGenerationPipeline(model, tokenizer)
