"""The OpenAI request bodies this server takes, checked strictly, and the prompts they make.

Fields are typed strictly (a string where a number belongs is refused, not converted); fields
the server does not know are ignored, as OpenAI's own API does. Every problem is one ApiError
naming the field. A chat is rendered with the tokenizer's chat template; a tokenizer without
one (a base model, like the built-in testbed) gets the messages' contents one per line, which
a base model continues like a completion.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from rankone.serve.errors import ApiError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    user: str | None = None
    logprobs: Any = None
    echo: bool | None = None


class CompletionBody(_Body):
    prompt: Union[str, list[str]]


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: Union[str, list[_Part], None] = None


class ChatBody(_Body):
    messages: list[_Message]
    max_completion_tokens: int | None = None


def parse(raw: bytes, cls: type[_Body]) -> Any:
    """The body as `cls`, or a 400 naming what is wrong."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    try:
        body = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"] if _is_field(x))
        said = "is required" if err["type"] == "missing" else f"{err['msg'].rstrip('.')} (got {_short(err.get('input'))})"
        raise ApiError(400, f"'{where}': {said}", "invalid_type", where.split(".")[0] or None) from None
    _check_common(body)
    return body


def _is_field(loc: Any) -> bool:
    """A field name or an index in an error's location; not one of the union's type tags (str, list[str], ...)."""
    return isinstance(loc, int) or (str(loc).isidentifier() and loc not in ("str", "int", "float", "bool", "none"))


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _check_common(b: _Body) -> None:
    if b.n not in (None, 1):
        raise ApiError(400, f"'n' must be 1 (one choice per request), not {b.n}", "unsupported", "n")
    if b.logprobs not in (None, False, 0):
        raise ApiError(400, "'logprobs' is not supported by this server", "unsupported", "logprobs")
    if b.echo:
        raise ApiError(400, "'echo' is not supported by this server", "unsupported", "echo")
    if b.temperature is not None and not 0 <= b.temperature <= 2:
        raise ApiError(400, f"'temperature' must be between 0 and 2, not {b.temperature}", "invalid_value", "temperature")
    if b.top_p is not None and not 0 < b.top_p <= 1:
        raise ApiError(400, f"'top_p' must be above 0 and at most 1, not {b.top_p}", "invalid_value", "top_p")
    stops = [b.stop] if isinstance(b.stop, str) else list(b.stop or [])
    if len(stops) > 4:
        raise ApiError(400, f"'stop' takes at most 4 strings, not {len(stops)}", "invalid_value", "stop")


def stops_of(b: _Body) -> list[str]:
    return [b.stop] if isinstance(b.stop, str) else list(b.stop or [])


def completion_prompt(b: CompletionBody) -> str:
    if isinstance(b.prompt, list):
        if len(b.prompt) != 1:
            raise ApiError(400, f"'prompt' must be one string (or a list of one), not a list of {len(b.prompt)}",
                           "unsupported", "prompt")
        return b.prompt[0]
    return b.prompt


def chat_prompt(tok: Any, b: ChatBody) -> tuple[str, bool]:
    """(text, whether it came from the chat template: then it already holds its special tokens)."""
    if not b.messages:
        raise ApiError(400, "'messages' is empty; send at least one message", "invalid_value", "messages")
    msgs = []
    for m in b.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        msgs.append({"role": m.role, "content": content})
    if getattr(tok, "chat_template", None):
        try:
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), True
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages is the caller's input
            raise ApiError(400, f"the model's chat template refused these messages: {e}", "invalid_value",
                           "messages") from None
    return "\n".join(m["content"] for m in msgs), False
