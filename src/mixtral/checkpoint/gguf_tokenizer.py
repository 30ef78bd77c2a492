"""The tokenizer a GGUF carries in its metadata (tokenizer.ggml.*), as a dict and as a Transformers-style folder.

A GGUF stores the vocabulary, merges, token types and special ids, never a tokenizer.json. We rebuild one with
the `tokenizers` library the way Transformers' GGUF conversion does: "gpt2" files are byte-level BPE, "llama"
files SentencePiece-style BPE with byte fallback. Control tokens become special tokens; user-defined ones plain
added tokens.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .source import CheckpointError

# tokenizer.ggml.token_type values
CONTROL, USER_DEFINED = 3, 4

# data key -> GGUF metadata key (all under "tokenizer.")
_KEYS = {
    "model": "ggml.model", "pre": "ggml.pre", "tokens": "ggml.tokens", "token_types": "ggml.token_type",
    "scores": "ggml.scores", "merges": "ggml.merges", "bos_token_id": "ggml.bos_token_id",
    "eos_token_id": "ggml.eos_token_id", "unk_token_id": "ggml.unknown_token_id",
    "pad_token_id": "ggml.padding_token_id", "add_bos_token": "ggml.add_bos_token",
    "add_eos_token": "ggml.add_eos_token", "add_space_prefix": "ggml.add_space_prefix",
    "chat_template": "chat_template",
}
_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unk_token_id",
            "pad_token": "pad_token_id"}

# Files converted from Llama 3-style tokenizers split text with this regex (Transformers' GGUF conversion too).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")}


def tokenizer_from_metadata(reader: Any, path: str) -> dict[str, Any]:
    """The tokenizer.* metadata of an open GGUFReader, under read_gguf_tokenizer's names."""
    data: dict[str, Any] = {}
    for name, key in _KEYS.items():
        field = reader.get_field(f"tokenizer.{key}")
        data[name] = field.contents() if field is not None else None
    if data["model"] is None or not data["tokens"]:
        raise CheckpointError(f"{path} carries no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens)")
    if data["add_bos_token"] is None:  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        data["add_bos_token"] = data["model"] == "llama"
    data["add_eos_token"] = bool(data["add_eos_token"])
    return data


def add_tokenizer_metadata(writer: Any, data: dict[str, Any]) -> None:
    """Store read_gguf_tokenizer's dict as tokenizer.* metadata on a GGUFWriter."""
    writer.add_tokenizer_model(data["model"])
    if data.get("pre"):
        writer.add_tokenizer_pre(data["pre"])
    writer.add_token_list(data["tokens"])
    for name, add in (("token_types", writer.add_token_types), ("scores", writer.add_token_scores),
                      ("merges", writer.add_token_merges)):
        if data.get(name):
            add(data[name])
    for name, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if data.get(name) is not None:
            add(int(data[name]))
    for name, add in (("add_bos_token", writer.add_add_bos_token), ("add_eos_token", writer.add_add_eos_token),
                      ("add_space_prefix", writer.add_add_space_prefix)):
        if data.get(name) is not None:
            add(bool(data[name]))
    if data.get("chat_template"):
        writer.add_chat_template(data["chat_template"])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _merges(data: dict[str, Any], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The file's merges, or (older SentencePiece files) the ones the vocabulary and its scores imply."""
    if data.get("merges"):
        return [tuple(m.split(" ", 1)) for m in data["merges"]]  # type: ignore[misc]
    scores = dict(zip(data["tokens"], data.get("scores") or [0.0] * len(data["tokens"])))
    found = []
    for token, score in scores.items():
        pairs = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        found.extend(sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]])))
    found.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def build_tokenizer(data: dict[str, Any]):
    """A `tokenizers.Tokenizer` for read_gguf_tokenizer's dict ("gpt2" byte-level BPE or "llama" SentencePiece BPE)."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors, Regex
        from tokenizers.models import BPE
    except ImportError:
        raise ImportError("writing tokenizer files needs the `tokenizers` library (pip install tokenizers)") from None
    kind, tokens = data["model"], data["tokens"]
    types = data.get("token_types") or [1] * len(tokens)
    if kind == "gpt2":
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        # Tokens outside the byte alphabet (rare) are respelled byte by byte, as Transformers does.
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        tok = Tokenizer(BPE(vocab=vocab, merges=_merges(data, vocab), dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
        split = _SPLITS.get(data.get("pre") or "")
        if split is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        control = [t for t, k in zip(tokens, types) if k == CONTROL and set(t) <= alphabet]
    elif kind == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        unk = tokens[data["unk_token_id"]] if data.get("unk_token_id") is not None else None
        tok = Tokenizer(BPE(vocab=vocab, merges=_merges(data, vocab), unk_token=unk, fuse_unk=True,
                            byte_fallback=True, dropout=None))
        prefix = data.get("add_space_prefix") is not False
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                     prepend_scheme="first" if prefix else "never")
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
        control = [t for t, k in zip(tokens, types) if k == CONTROL] + ([unk] if unk is not None else [])
    else:
        raise CheckpointError(f"tokenizer model {kind!r} is not supported (expected 'gpt2' or 'llama')")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(control)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])

    def template(seq: str) -> str:
        bos = f"{tokens[data['bos_token_id']]}:{seq[-1]} " if data.get("add_bos_token") else ""
        eos = f" {tokens[data['eos_token_id']]}:{seq[-1]}" if data.get("add_eos_token") else ""
        return f"{bos}{seq}{eos}"

    specials = {tokens[data[f"{k}_token_id"]]: data[f"{k}_token_id"] for k in ("bos", "eos") if data.get(f"add_{k}_token")}
    tok.post_processor = processors.TemplateProcessing(single=template("$A:0"),
                                                       pair=f"{template('$A:0')} {template('$B:1')}",
                                                       special_tokens=list(specials.items()))
    return tok


def write_tokenizer_files(data: dict[str, Any], folder: str | os.PathLike) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json: a Transformers-style tokenizer folder."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    build_tokenizer(data).save(os.path.join(folder, "tokenizer.json"))
    tokens = data["tokens"]
    special = {name: tokens[data[key]] for name, key in _SPECIAL.items() if data.get(key) is not None}
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                              "add_bos_token": bool(data.get("add_bos_token")),
                              "add_eos_token": bool(data.get("add_eos_token")),
                              "clean_up_tokenization_spaces": False}
    if data.get("chat_template"):
        config["chat_template"] = data["chat_template"]
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
            f.write("\n")


def tokenizer_data_from_folder(folder: str) -> dict[str, Any] | None:
    """read_gguf_tokenizer's dict for a Transformers-style folder: byte-level BPE tokenizer.json ("gpt2") or a
    SentencePiece tokenizer.model ("llama"); None when the folder has neither."""
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = json.load(open(config_path, encoding="utf-8")) if os.path.isfile(config_path) else {}
    tj, sp_path = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer.model")
    if os.path.isfile(tj):
        with open(tj, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec.get("model", {})
        if model.get("type") != "BPE":
            raise CheckpointError(f"{tj}: only BPE tokenizers can be written to GGUF, not {model.get('type')!r}")
        vocab = dict(model["vocab"])
        special = set()
        for added in spec.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
            if added.get("special"):
                special.add(added["id"])
        tokens = [""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            tokens[i] = token
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        data: dict[str, Any] = {"model": "gpt2", "tokens": tokens, "merges": merges,
                                "token_types": [CONTROL if i in special else 1 for i in range(len(tokens))]}
        ids = {name: vocab.get(_token_content(config.get(name))) for name in _SPECIAL}
    elif os.path.isfile(sp_path):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=sp_path)
        n = sp.get_piece_size()
        kinds = [2 if sp.is_unknown(i) else CONTROL if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                 for i in range(n)]
        data = {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(n)],
                "scores": [sp.get_score(i) for i in range(n)], "token_types": kinds}
        ids = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(),
               "pad_token": sp.pad_id()}
    else:
        return None
    for name, key in _SPECIAL.items():
        data[key] = ids.get(name) if ids.get(name) is not None and ids.get(name) >= 0 else None
    data["add_bos_token"] = config.get("add_bos_token", data["model"] == "llama")
    data["add_eos_token"] = bool(config.get("add_eos_token", False))
    data["chat_template"] = config.get("chat_template")
    return data


def _token_content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value
