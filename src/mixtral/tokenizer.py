"""Mixtral's tokenizer: sentencepiece `.model` or `tokenizer.json` files, padding and chat templates.

The libraries behind each path are imported only when that path is used: sentencepiece for `.model`
files, tokenizers for `tokenizer.json` (and GGUF BPE vocabularies), jinja2 for chat templates.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

# Mixtral-Instruct's prompt format, written to encode token for token as mistral-common's v1
# instruct tokenizer does: "<s>[INST] {user} [/INST] {assistant}</s>[INST] {user2} [/INST]". Each
# chunk between special tokens gets sentencepiece's dummy "▁" prefix, which mistral-common gets by
# encoding each message on its own. A system prompt goes into the *first* user turn (mistral-common
# v1, and Mixtral's Hub template; mistral-common v2+ put it into the last one instead).
MIXTRAL_CHAT_TEMPLATE = r"""
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- '[INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_CONFIG_KEYS = {*_SPECIAL_NAMES, "add_bos_token", "add_eos_token", "chat_template", "padding_side",
                "truncation_side", "clean_up_tokenization_spaces", "split_special_tokens"}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # llama.cpp's token types


class BatchEncoding(dict):
    """Model inputs (`input_ids`, `attention_mask`): a dict that also allows attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: torch.device | str) -> BatchEncoding:
        """Move every tensor to `device`, in place; returns self as Transformers does."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


def _require(module: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs the {module} library: pip install {module}") from e


def _alternation(strings: Sequence[str]) -> re.Pattern[str] | None:
    # Longest first, so the leftmost match is also the longest, as the tokenizers library matches
    pieces = sorted(strings, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, pieces))) if pieces else None


def _special_matches(pattern: re.Pattern[str] | None, text: str,
                     protected: Sequence[tuple[int, int]] | None) -> Iterator[re.Match[str]]:
    """Special-token strings in `text`, searched only outside the sorted `protected` (start, end) spans.

    A string that crosses a span's edge is partly content, so it stays text too.
    """
    if pattern is None:
        return
    bounds = [0, *(i for span in protected or () for i in span), len(text)]
    for start, end in zip(bounds[::2], bounds[1::2]):
        yield from pattern.finditer(text, start, end)


def _truncate(ids: list[int], max_length: int | None, side: str) -> list[int]:
    if max_length is None or len(ids) <= max_length:
        return ids
    return ids[len(ids) - max_length:] if side == "left" else ids[:max_length]


class _SentencePieceBackend:
    """Encodes with sentencepiece itself, so ids match Mistral's reference tokenizer exactly."""

    def __init__(self, model_file: Path):
        sentencepiece = _require("sentencepiece", f"Reading {model_file}")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        # sentencepiece never emits control pieces (<s>, </s>, [INST] in later Mistral vocabularies)
        # or <unk> from text, so we match their strings ourselves, as Transformers does.
        self.special_ids = {i for i in range(self.sp.get_piece_size())
                            if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._special_re = _alternation([self.sp.id_to_piece(i) for i in self.special_ids])
        self._prefix: list[int] = []
        self._suffix: list[int] = []

    def set_bos_eos(self, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
        self._prefix = [bos[1]] if bos else []
        self._suffix = [eos[1]] if eos else []

    def encode(self, text: str, add_special_tokens: bool, max_length: int | None, side: str,
               protected: Sequence[tuple[int, int]] | None = None) -> list[int]:
        # Special-token strings inside `protected` spans are left to sentencepiece, which reads them as
        # text (it never emits control pieces from text), exactly as mistral-common encodes content.
        ids: list[int] = []
        pos = 0
        for match in _special_matches(self._special_re, text, protected):
            ids += self.sp.encode(text[pos:match.start()])  # each chunk gets the dummy "▁" prefix
            ids.append(self.sp.piece_to_id(match.group()))
            pos = match.end()
        ids += self.sp.encode(text[pos:])
        if not add_special_tokens:
            return _truncate(ids, max_length, side)
        room = None if max_length is None else max(max_length - len(self._prefix) - len(self._suffix), 0)
        return self._prefix + _truncate(ids, room, side) + self._suffix

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        # Decoding each run between special tokens on its own drops the "▁" each run got when
        # encoded, so decode(encode(text)) == text for a rendered chat prompt too.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids:
                parts += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(parts) + self.sp.decode(run)

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.sp.get_piece_size() else None

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    total_size = vocab_size


class _TokenizersBackend:
    """Wraps a `tokenizers.Tokenizer` (tokenizer.json, or a vocabulary built in memory)."""

    def __init__(self, tokenizer: Any):
        self.tk = tokenizer
        self.special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._special_re = _alternation([tokenizer.id_to_token(i) for i in self.special_ids])

    @functools.cached_property
    def _as_text(self) -> tuple[Any, dict[str, str], dict[int, int]]:
        """A copy of the tokenizer that reads special-token strings as text, and aliases that stand for them.

        The copy has its own `encode_special_tokens` flag, so `self.tk` is never switched and no state
        leaks between calls or threads. Special tokens that must stay special (a chat template's markup)
        are written as aliases: non-special added tokens, which the copy still matches. The text is then
        encoded in one pass that splits where the original would (so e.g. Metaspace's
        prepend_scheme="first" sees the same offsets); the random nonce keeps user text from writing one.
        """
        from tokenizers import AddedToken, Tokenizer

        tk = Tokenizer.from_str(self.tk.to_str())
        tk.encode_special_tokens = True
        nonce = secrets.token_hex(8)
        added = self.tk.get_added_tokens_decoder()
        aliases = {added[i].content: f"\ue000{nonce}:{i}\ue001" for i in self.special_ids}
        tk.add_tokens([AddedToken(aliases[added[i].content], lstrip=added[i].lstrip, rstrip=added[i].rstrip,
                                  normalized=False, special=False) for i in self.special_ids])
        real_ids = {tk.token_to_id(aliases[added[i].content]): i for i in self.special_ids}
        return tk, aliases, real_ids

    def set_bos_eos(self, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
        from tokenizers import processors

        def template(seq: str, type_id: int) -> list[str]:
            parts = [f"{bos[0]}:{type_id}"] if bos else []
            return parts + [f"{seq}:{type_id}"] + ([f"{eos[0]}:{type_id}"] if eos else [])

        single, pair = template("$A", 0), template("$A", 0) + template("$B", 1)
        self.tk.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[t for t in (bos, eos) if t])
        self.__dict__.pop("_as_text", None)  # the copy must get the new post-processor too

    def encode(self, text: str, add_special_tokens: bool, max_length: int | None, side: str,
               protected: Sequence[tuple[int, int]] | None = None) -> list[int]:
        tk, real_ids = self.tk, {}  # real_ids: alias id -> special token id
        if protected is not None:  # special tokens outside `protected` become aliases, the rest is text
            tk, aliases, real_ids = self._as_text
            parts: list[str] = []
            pos = 0
            for match in _special_matches(self._special_re, text, protected):
                parts += [text[pos:match.start()], aliases[match.group()]]
                pos = match.end()
            text = "".join(parts) + text[pos:]
        encoding = tk.encode(text, add_special_tokens=False)
        if max_length is not None:
            room = max_length - (tk.num_special_tokens_to_add(False) if add_special_tokens else 0)
            encoding.truncate(max(room, 0), direction=side)
        if add_special_tokens:
            encoding = tk.post_process(encoding)
        return [real_ids.get(i, i) for i in encoding.ids] if real_ids else encoding.ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=False)

    def total_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as serialized AddedTokens
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _clean_up_tokenization(text: str) -> str:
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> Any:
    _require("jinja2", "Rendering chat templates")
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        # Transformers raises jinja2's TemplateError here; a ValueError says "bad input" more plainly
        raise ValueError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters, which chat templates must not do
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # Hub templates are untrusted code: render them sandboxed, with Transformers' whitespace settings
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _content_spans(template: Any, messages: list[dict[str, Any]], variables: dict[str, Any],
                   text: str) -> list[tuple[int, int]]:
    """The (start, end) spans of the rendered chat `text` that hold message contents, in order.

    Renders again with each content replaced by a sentinel, then walks that skeleton against `text`:
    the markup between sentinels must reappear verbatim, and each sentinel is its content as written
    or as the template trimmed it (`| trim`, `.strip()`). Anything else the template does to content
    (or to the markup because of it) is refused rather than guessed at.
    """
    nonce = secrets.token_hex(8)  # unguessable, so no content or template variable can hold a sentinel
    contents: list[str] = []

    def sentinel(content: str) -> str:
        contents.append(content)
        return f"\ue000{nonce}:{len(contents) - 1}\ue001"

    # Every non-empty content is marked, not just those holding a special-token string: two contents
    # written side by side ("</" + "s>") could form one. Empty ones stay, so `{% if content %}` still holds.
    def marked(message: dict[str, Any]) -> dict[str, Any]:
        content = message.get("content")
        if isinstance(content, str) and content:
            return {**message, "content": sentinel(content)}
        if isinstance(content, list):  # OpenAI-style parts: [{"type": "text", "text": ...}, ...]
            return {**message, "content": [{**part, "text": sentinel(part["text"])}
                                           if isinstance(part, dict) and part.get("text") and
                                           isinstance(part["text"], str) else part
                                           for part in content]}
        return message

    skeleton = template.render(messages=[marked(m) for m in messages], **variables)
    pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", skeleton)  # markup, index, markup, ..., index, markup
    refused = ValueError("split_special_tokens cannot tell message contents from markup in this chat template's "
                         "output: the template changes contents other than by trimming them")
    if not text.startswith(pieces[0]):
        raise refused
    spans: list[tuple[int, int]] = []
    pos = len(pieces[0])
    for index, markup in zip(pieces[1::2], pieces[2::2]):
        content = contents[int(index)]
        for form in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            if text.startswith(form + markup, pos):
                break
        else:
            raise refused
        spans.append((pos, pos + len(form)))
        pos += len(form) + len(markup)
    if pos != len(text):
        raise refused
    return spans


class MixtralTokenizer:
    """Text <-> token ids with Transformers' tokenizer API, from sentencepiece or tokenizer.json files."""

    def __init__(self, backend: _SentencePieceBackend | _TokenizersBackend, config: dict[str, Any]):
        self._backend = backend
        self.padding_side: str = config.get("padding_side") or "left"  # left padding is what generation needs
        self.truncation_side: str = config.get("truncation_side") or "right"
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        # The default for calls: read special-token strings in the text as text (chat markup stays special)
        self.split_special_tokens = bool(config.get("split_special_tokens", False))
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: Transformers uses "default"
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template: str | None = template
        self.special_tokens: dict[str, str] = {}
        self._special_ids: dict[str, int] = {}
        for name in _SPECIAL_NAMES:
            token = _token_str(config.get(name))
            token_id = None if token is None else backend.token_to_id(token)
            if token is not None and token_id is not None:
                self.special_tokens[name], self._special_ids[name] = token, token_id
        # Given add_bos_token/add_eos_token flags replace any post-processor tokenizer.json brought along
        if "add_bos_token" in config or "add_eos_token" in config:
            def added(name: str) -> tuple[str, int] | None:  # e.g. "bos_token", read with its add_bos_token flag
                wanted = config.get(f"add_{name}") and name in self._special_ids
                return (self.special_tokens[name], self._special_ids[name]) if wanted else None

            backend.set_bos_eos(added("bos_token"), added("eos_token"))

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> MixtralTokenizer:
        """Load from a folder with tokenizer.json or tokenizer.model (plus tokenizer_config.json), or one such file.

        A file path ending in `.json` is read with tokenizers, any other file (e.g. `tokenizer.model.v1`)
        with sentencepiece. `overrides` replace tokenizer_config.json keys, e.g. `padding_side="right"` or
        `split_special_tokens=True`.
        """
        path = Path(path)
        unknown = set(overrides) - _CONFIG_KEYS
        if unknown:
            raise TypeError(f"Unknown tokenizer options {sorted(unknown)}; known: {sorted(_CONFIG_KEYS)}")
        if path.is_file():
            folder, tokenizer_file = path.parent, path
        elif path.is_dir():
            found = [f for f in (path / "tokenizer.json", path / "tokenizer.model") if f.is_file()]
            if not found:
                raise FileNotFoundError(f"No tokenizer.json or tokenizer.model in tokenizer folder {path}")
            folder, tokenizer_file = path, found[0]  # tokenizer.json first, as Transformers prefers it
        else:
            raise FileNotFoundError(f"Tokenizer path {path} does not exist (expected a folder holding "
                                    "tokenizer.json or tokenizer.model, or one of those files)")

        config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        if (folder / "chat_template.jinja").is_file():  # Transformers saves templates here and prefers it
            config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        backend: _SentencePieceBackend | _TokenizersBackend
        if tokenizer_file.suffix == ".json":
            tokenizers = _require("tokenizers", f"Reading {tokenizer_file}")
            # As in Transformers 5, tokenizer.json's post-processor decides BOS/EOS, not the config's flags
            config.pop("add_bos_token", None)
            config.pop("add_eos_token", None)
            config.update(overrides)
            backend = _TokenizersBackend(tokenizers.Tokenizer.from_file(str(tokenizer_file)))
        else:
            config.update(overrides)
            sp_backend = _SentencePieceBackend(tokenizer_file)
            sp = sp_backend.sp
            # The .model file names its own special pieces; Llama-family defaults add BOS but not EOS
            defaults = {name: sp.id_to_piece(i) for name, i in zip(
                _SPECIAL_NAMES, (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id())) if i >= 0}
            config = {**defaults, "add_bos_token": True, "add_eos_token": False,
                      **{k: v for k, v in config.items() if v is not None}}
            backend = sp_backend
        return cls(backend, config)

    @classmethod
    def from_bpe(cls, tokens: list[str], merges: list[str], bos_token_id: int | None, eos_token_id: int | None,
                 pad_token_id: int | None = None, unk_token_id: int | None = None, add_bos_token: bool = False,
                 chat_template: str | None = None, token_types: Sequence[int] | None = None) -> MixtralTokenizer:
        """Build a GPT-2 style byte-level BPE tokenizer from in-memory data (as GGUF files store it).

        `token_types` are llama.cpp's: control tokens (3) become special tokens, user-defined ones (4)
        are matched whole in text; the named bos/eos/pad/unk tokens are always special.
        """
        _require("tokenizers", "Building a BPE tokenizer")
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        # llama.cpp splits a merge at the first space after its first character
        pairs = [(m[:m.index(" ", 1)], m[m.index(" ", 1) + 1:]) for m in merges]
        unk = tokens[unk_token_id] if unk_token_id is not None else None
        tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs, unk_token=unk))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        named = {i for i in (bos_token_id, eos_token_id, pad_token_id, unk_token_id) if i is not None}
        types = list(token_types) if token_types is not None else [1] * len(tokens)
        specials = sorted(named | {i for i, t in enumerate(types) if t == _GGUF_CONTROL})
        tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in specials])
        tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                       for i, t in enumerate(types) if t == _GGUF_USER_DEFINED])
        config: dict[str, Any] = {"add_bos_token": add_bos_token, "add_eos_token": False,
                                  "chat_template": chat_template}
        for name, i in zip(_SPECIAL_NAMES, (bos_token_id, eos_token_id, unk_token_id, pad_token_id)):
            if i is not None:
                config[name] = tokens[i]
        return cls(_TokenizersBackend(tk), config)

    # -- special tokens and vocabulary ------------------------------------------------------------

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None."""
        return self._special_ids.get("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of the end-of-sequence token, or None."""
        return self._special_ids.get("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """Id of the padding token, or None (padding then uses the EOS id, masked out)."""
        return self._special_ids.get("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        """Id of the unknown token, or None."""
        return self._special_ids.get("unk_token")

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every special token (the named ones and the vocabulary's control tokens)."""
        return sorted(set(self._special_ids.values()) | self._backend.special_ids)

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        return self._backend.vocab_size()

    def __len__(self) -> int:
        return self._backend.total_size()

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        """Token string(s) for one id or a sequence of ids."""
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Id(s) of token strings; unknown tokens map to the unk id (None without one)."""
        def to_id(token: str) -> int | None:
            token_id = self._backend.token_to_id(token)
            return self.unk_token_id if token_id is None else token_id

        return to_id(tokens) if isinstance(tokens, str) else [to_id(t) for t in tokens]

    # -- encoding and decoding --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. "</s>") become their ids unless split.

        `split_special_tokens` (default: the tokenizer's) reads them as text instead; BOS/EOS are still added.
        """
        return self._encode(text, add_special_tokens, None, split_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool, max_length: int | None,
                split_special_tokens: bool | None) -> list[int]:
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        protected = [(0, len(text))] if split else None  # all of it is content
        return self._backend.encode(text, add_special_tokens, max_length, self.truncation_side, protected)

    def __call__(self, text: str | list[str], return_tensors: str | None = None, padding: bool | str = False,
                 truncation: bool = False, max_length: int | None = None, add_special_tokens: bool = True,
                 split_special_tokens: bool | None = None) -> BatchEncoding:
        """Encode a string or a batch into `input_ids` and `attention_mask`, padded on `padding_side`.

        Without a pad token, padding uses the EOS id (masked out by `attention_mask`).
        """
        batch = [text] if isinstance(text, str) else list(text)
        limit = max_length if truncation else None
        ids = [self._encode(t, add_special_tokens, limit, split_special_tokens) for t in batch]
        return self._batch_encoding(ids, isinstance(text, str), return_tensors, padding, max_length)

    def _batch_encoding(self, ids: list[list[int]], single: bool, return_tensors: str | None,
                        padding: bool | str, max_length: int | None) -> BatchEncoding:
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        masks = [[1] * len(x) for x in ids]

        if padding in (True, "longest", "max_length"):
            if padding != "max_length":
                width = max(map(len, ids), default=0)
            elif max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            else:
                width = max_length
            pad_id = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
            if pad_id is None:
                raise ValueError("Padding needs a pad or EOS token, and this tokenizer has neither")
            for x, m in zip(ids, masks):
                fill = max(width - len(x), 0)
                if self.padding_side == "left":
                    x[:0], m[:0] = [pad_id] * fill, [0] * fill
                else:
                    x += [pad_id] * fill
                    m += [0] * fill
        elif padding not in (False, "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")

        if return_tensors == "pt":
            if len({len(x) for x in ids}) > 1:
                raise ValueError("Sequences have different lengths; pass padding=True to make a tensor")
            return BatchEncoding(input_ids=torch.tensor(ids, dtype=torch.long).view(len(ids), -1),  # (B, T)
                                 attention_mask=torch.tensor(masks, dtype=torch.long).view(len(ids), -1))
        if single:
            return BatchEncoding(input_ids=ids[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=ids, attention_mask=masks)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of a list or 1-D tensor of ids; special tokens are shown unless skipped."""
        token_ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        if isinstance(token_ids, int):  # a 0-d tensor
            token_ids = [token_ids]
        if skip_special_tokens:  # named special tokens may be plain vocabulary entries in tokenizer.json
            named = set(self._special_ids.values())
            token_ids = [i for i in token_ids if i not in named]
        text = self._backend.decode(token_ids, skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor,
                     skip_special_tokens: bool = False) -> list[str]:
        """Decode each sequence of a batch (a list of lists or a 2-D tensor)."""
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # -- chat -------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, return_tensors: str | None = None,
                            return_dict: bool = False, chat_template: str | None = None,
                            split_special_tokens: bool | None = None,
                            **template_kwargs: Any) -> str | list[int] | torch.Tensor | BatchEncoding:
        """Render `messages` with the chat template (Mixtral-Instruct's if none); tokenize unless told not to.

        Returns the text, the ids (a list, or a (1, T) tensor with return_tensors="pt"), or with
        return_dict=True (Transformers 5's default) the whole BatchEncoding. `split_special_tokens`
        (default: the tokenizer's) reads special-token strings in message contents as text, while the
        template's own markup keeps its special tokens.
        """
        template = _compile_chat_template(chat_template or self.chat_template or MIXTRAL_CHAT_TEMPLATE)
        variables = {"add_generation_prompt": add_generation_prompt, **self.special_tokens, **template_kwargs}
        text = template.render(messages=messages, **variables)
        if not tokenize:
            return text
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        protected = _content_spans(template, messages, variables, text) if split else None
        # The template writes BOS itself, so add no special tokens here (as Transformers does)
        ids = self._backend.encode(text, False, None, self.truncation_side, protected)
        encoded = self._batch_encoding([ids], True, return_tensors, False, None)
        return encoded if return_dict else encoded["input_ids"]


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a checkpoint folder's tokenizer (and generation config) files into another checkpoint folder; a GGUF
    source has its tokenizer rebuilt from its metadata."""
    import shutil

    src, dst = os.fspath(src), os.fspath(dst)
    if src.endswith(".gguf"):
        from .checkpoint.gguf import read_gguf_tokenizer, write_tokenizer_files

        write_tokenizer_files(read_gguf_tokenizer(src), dst)
    elif os.path.isdir(src):
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json"):
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), os.path.join(dst, name))


AutoTokenizer = MixtralTokenizer
