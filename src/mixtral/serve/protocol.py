"""The OpenAI request bodies the server accepts (pydantic), and OpenAI's error body.

Every field of OpenAI's completions and chat completions requests is either served or refused, never ignored:
- served: declared below, with the ranges the engine can take (plus vLLM's top_k, min_p, repetition_penalty);
- accepted because they cannot change the answer (metadata, user, ...): declared too, typed;
- refused: listed in a model's NO_OP table with the values that ask for nothing (absent, null, "text"...); any
  other value is a 400 naming the field. A field that is in neither is a 400 too, as OpenAI answers.
Types are strict (JSON's own: "5" is not a number, 5.0 not an integer, true not an integer), floats finite.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT64 = 2**63  # integers are int64, as OpenAI's: bigger ones are a 400, not an overflow deep in torch
MAX_STOPS, MAX_STOP_CHARS = 4, 1000  # OpenAI's 4; a stop string's end is matched against the text at each token


class APIError(Exception):
    """An error that becomes OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Strict(BaseModel):
    """Strict JSON types, finite floats; fields not declared are kept in model_extra for refuse_unsupported()."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    # field -> the values that ask for nothing; any other value of the field is refused
    NO_OP: ClassVar[dict[str, tuple[Any, ...]]] = {}


def refuse_unsupported(req: BaseModel, path: str = "") -> None:
    """A 400 for the first field of `req` (or of its nested models) that is not served and asks for something."""
    for name, value in (req.model_extra or {}).items():
        no_op = getattr(req, "NO_OP", {})
        if name not in no_op:
            raise APIError(400, f"{path}{name}: unrecognized request argument", param=path + name,
                           code="unsupported_field")
        if not any(type(value) is type(ok) and value == ok for ok in no_op[name]):
            allowed = " or ".join(json.dumps(ok) for ok in no_op[name])
            raise APIError(400, f"{path}{name}: not supported by this server (accepted only as {allowed})",
                           param=path + name, code="unsupported_field")
    for name in type(req).model_fields:
        value = getattr(req, name)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, BaseModel):
                refuse_unsupported(item, f"{path}{name}.{i}." if isinstance(value, list) else f"{path}{name}.")


Stop = Union[str, list[str], None]


class StreamOptions(Strict):
    NO_OP = {"include_obfuscation": (None, False)}

    include_usage: bool | None = None


class SamplingFields(Strict):
    """What completions and chat completions share."""

    NO_OP = {"store": (None, False), "service_tier": (None, "auto", "default")}

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, lt=INT64)
    temperature: float | None = Field(default=None, ge=0, le=2)  # 0: greedy; unset: 1.0, as OpenAI
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, lt=INT64)  # 0 or -1: no top-k (vLLM's -1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=100)  # past these, logits overflow fp32
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's form) -> a bias in [-100, 100]
    stop: Stop = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    n: int = Field(default=1, ge=1, lt=INT64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # these three only name the caller
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # a caching hint: there is no cache across requests to steer

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: Stop) -> Stop:
        for s in [v] if isinstance(v, str) else v or []:
            if not 1 <= len(s) <= MAX_STOP_CHARS:
                raise ValueError(f"stop strings must have 1 to {MAX_STOP_CHARS} characters")
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        seen: set[int] = set()
        for token, bias in (v or {}).items():
            if not token.isascii() or not token.isdigit() or len(token) > 18:
                raise ValueError(f"keys must be token ids, got {token[:40]!r}")
            if int(token) in seen:  # "7" and "07": one bias a token, not their sum
                raise ValueError(f"token {int(token)} is given twice")
            seen.add(int(token))
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {token}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_strings(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(SamplingFields):
    NO_OP = {**SamplingFields.NO_OP, "suffix": (None, "")}  # no fill-in-the-middle

    prompt: Prompt
    max_tokens: int | None = Field(default=None, ge=0, lt=INT64)  # 0: score the prompt (with echo and logprobs)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool | None = False
    best_of: int | None = Field(default=None, ge=1, lt=INT64)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Prompt) -> Prompt:
        if isinstance(v, list) and (not v or any(isinstance(p, (str, list)) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    # a text model without tools: nothing that names a participant, calls or answers a tool, or carries audio
    NO_OP = {"name": (None,), "tool_calls": (None, []), "tool_call_id": (None,), "function_call": (None,),
             "refusal": (None,), "audio": (None,)}

    role: str
    content: Union[str, list[TextPart], None] = None  # text parts only: this is a text model

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    NO_OP = {**SamplingFields.NO_OP, "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
             "function_call": (None, "none"), "parallel_tool_calls": (None, True, False),
             "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
             "prediction": (None,), "reasoning_effort": (None,), "verbosity": (None,),
             "web_search_options": (None,)}

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, lt=INT64)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]
