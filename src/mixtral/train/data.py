"""Fine-tuning data: jsonl of {"text": ...} or chat {"messages": [...]}, or plain .txt, as token ids and labels.

A text trains on all its tokens; a conversation only on its assistant turns (each turn's tokens are what the chat
template adds for it, so the mask follows our template exactly); a .txt file is cut into max_length windows. Every
problem names the file and line. Labels are -100 where no loss is taken. `pack` puts several examples in one row of
max_length tokens, each with its own positions (from 0) and blind to the others (attention.packed_mask).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from ..model.losses import IGNORE_INDEX


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    position_ids: list[int] | None = None  # packed: restarting at 0 where each document starts

    @property
    def trained_tokens(self) -> int:  # tokens whose next token is predicted with a loss
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def load_examples(path: str | os.PathLike, tokenizer: Any, max_length: int) -> list[Example]:
    """The examples of a .jsonl or .txt file, each cut to max_length tokens."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file {path}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            ids = tokenizer.encode(f.read())
        examples = [Example(ids[i:i + max_length], ids[i:i + max_length]) for i in range(0, len(ids), max_length)]
        examples = [e for e in examples if e.trained_tokens]
        if not examples:
            raise ValueError(f"{path}: no text to train on")
        return examples
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not JSON (each line of a .jsonl file is one example)") from None
            examples.append(_example(record, tokenizer, max_length, f"{path}:{number}"))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def _example(record: Any, tokenizer: Any, max_length: int, where: str) -> Example:
    if not isinstance(record, dict) or not ("text" in record or "messages" in record):
        raise ValueError(f"{where}: an example needs a \"text\" string or a \"messages\" list")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError(f"{where}: \"text\" must be a string")
        ids = tokenizer.encode(record["text"])[:max_length]
        example = Example(ids, list(ids))
    else:
        example = _conversation(record["messages"], tokenizer, where)
        example = Example(example.input_ids[:max_length], example.labels[:max_length])
    if not example.trained_tokens:
        raise ValueError(f"{where}: nothing to train on (no assistant tokens within max_length={max_length})")
    return example


def _conversation(messages: Any, tokenizer: Any, where: str) -> Example:
    """Tokens of the templated conversation; labels on the tokens each assistant message adds."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 and isinstance(m.get("role"), str) for m in messages):
        raise ValueError(f"{where}: \"messages\" must be a list of {{\"role\": ..., \"content\": ...}}")
    known = {"system", "user", "assistant"}
    unknown = sorted({m["role"] for m in messages} - known)
    if unknown:
        raise ValueError(f"{where}: role {unknown[0]!r} is not one the chat template knows "
                         f"({', '.join(sorted(known))})")
    try:
        ids = tokenizer.apply_chat_template(messages)
    except Exception as e:  # the template's own checks (alternating roles, ...)
        raise ValueError(f"{where}: the chat template refuses these messages: {e}") from None
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else []
        upto = tokenizer.apply_chat_template(messages[:i + 1])
        if ids[:len(upto)] != upto or upto[:len(before)] != before:
            raise ValueError(f"{where}: the chat template does not render this conversation prefix by prefix, so "
                             "the assistant turns cannot be told apart")
        labels[len(before):len(upto)] = upto[len(before):]
    return Example(ids, labels)


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle, then the last eval_fraction held out (at least one example when eval_fraction > 0)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = max(1, round(eval_fraction * len(examples))) if eval_fraction > 0 else 0
    if held >= len(examples):
        raise ValueError(f"{len(examples)} examples leave none to train on after holding out {held}")
    return [examples[i] for i in order[:len(order) - held]], [examples[i] for i in order[len(order) - held:]]


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Examples packed in order into rows of at most max_length tokens (a new row when the next one does not fit).
    Each document's positions start at 0 and its first token gets no label (nothing before it in its document
    predicts it), so a packed row's loss is the sum of its documents' own."""
    packs: list[Example] = []
    for e in examples:
        if not packs or len(packs[-1].input_ids) + len(e.input_ids) > max_length:
            packs.append(Example([], [], []))
        row = packs[-1]
        row.input_ids += e.input_ids
        row.labels += [IGNORE_INDEX] + e.labels[1:]
        row.position_ids += range(len(e.input_ids))
    return packs


def collate(batch: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (B, S); position_ids (B, S) too for packed examples (the
    padding at 0: each pad token a document of its own)."""
    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    positions = torch.zeros((len(batch), length), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        positions[row, :n] = torch.tensor(e.position_ids if e.position_ids is not None else range(n))
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.position_ids is not None for e in batch):
        out["position_ids"] = positions
    return out


def batch_at(examples: list[Example], index: int, batch_size: int, seed: int) -> list[Example]:
    """Micro-batch `index` of an endless stream: epoch after epoch, each in its own seeded order. A function of
    the index alone, so that a resumed run reads exactly what the uninterrupted one would have."""
    per_epoch = max(1, len(examples) // batch_size)
    epoch, i = divmod(index, per_epoch)
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [examples[j] for j in order[i * batch_size:(i + 1) * batch_size]]
