"""Request bodies of the OpenAI-compatible API (pydantic), as OpenAI documents them.

Fields we cannot honour are declared and refused by name rather than silently ignored
(a client asking for tools or a presence penalty would otherwise get a different answer
than it asked for); bookkeeping fields OpenAI clients send (user, metadata, store, ...)
are accepted and ignored; anything else is refused as unrecognised, as OpenAI does.
vLLM's common extensions top_k, repetition_penalty and ignore_eos are accepted."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from ..engine.request import MAX_STOP_CHARS, MAX_STOP_STRINGS, SEED_MAX, SEED_MIN
from ..errors import InvalidArgument

MAX_CHOICES = 16
"""Completions a request may ask for at once (n × prompts): each is a row of the batch."""

Stop = Union[StrictStr, list[StrictStr], None]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Stop = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions (openai clients send them with extra_body)
    top_k: StrictInt | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    ignore_eos: StrictBool = False
    # hotswap's: the named LoRA adapter's delta scaled for this request (PEFT's set_scale), as gRPC's lora_scale
    lora_scale: float | None = Field(None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _supported(self) -> "_Body":
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise _unsupported(name, "is not supported; use repetition_penalty (1 = off)")
        if self.logit_bias:
            raise _unsupported("logit_bias", "is not supported")
        if self.stream_options is not None and not self.stream:
            raise _unsupported("stream_options", "is only allowed with stream: true")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise _unsupported("stop", f"give at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    # Clients send history back with fields of their own (name, refusal, tool_calls: null).
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    tool_calls: list[Any] | None = None

    @model_validator(mode="after")
    def _text_only(self) -> "ChatMessage":
        if self.tool_calls:
            raise _unsupported("tool_calls", "tool calls are not supported")
        return self

    def as_engine(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> "ChatCompletionRequest":
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise _unsupported(name, "tool and function calling are not supported")
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            raise _unsupported("tool_choice", "tool and function calling are not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise _unsupported("response_format", "only {\"type\": \"text\"} is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise _unsupported("top_logprobs", "needs logprobs: true")
        if self.modalities and set(self.modalities) != {"text"}:
            raise _unsupported("modalities", "only text is supported")
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise _unsupported("max_completion_tokens", "differs from max_tokens; give one of them")
        return self

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Body):
    # A string, a list of strings, token ids, or a list of token-id lists (OpenAI's four forms).
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    @model_validator(mode="after")
    def _completion_supported(self) -> "CompletionRequest":
        if self.echo:
            raise _unsupported("echo", "is not supported")
        if self.suffix:
            raise _unsupported("suffix", "is not supported")
        if self.best_of not in (None, self.n):
            raise _unsupported("best_of", "is not supported (other than equal to n)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise _unsupported("prompt", "give at least one prompt")
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise _unsupported("n", f"{len(self.prompts)} prompts × n={self.n} completions; at most {MAX_CHOICES} in one request")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    @property
    def new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return self.logprobs


def _unsupported(field: str, message: str) -> InvalidArgument:
    # Not a ValueError: pydantic lets it through unwrapped, so it keeps the field it names.
    return InvalidArgument(message, field=field)


_Body.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
