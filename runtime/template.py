"""The model's own chat template, rendered the way transformers renders it (no transformers needed).

A fine-tuned model only answers well when its prompt looks exactly like its training data, so we
use the Jinja template saved with the model, in the same sandboxed environment, with the same
globals (`raise_exception`, `strftime_now`) and the same variables (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, ...). onnxruntime-genai's own
`apply_chat_template` is not used: it does not promise the same output for every template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.errors import GenerationError, ModelError


@dataclass
class ChatTemplate:
    """The model's own Jinja chat template, rendered the way transformers renders it."""

    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)
    origin: str = ""
    _compiled: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_folder(cls, folder: Path, tokenizer_config: dict) -> ChatTemplate:
        """The template in tokenizer_config.json's `chat_template`, else in chat_template.jinja."""
        template, origin = tokenizer_config.get("chat_template"), folder / "tokenizer_config.json"
        if isinstance(template, list):  # the older multi-template form: [{"name": "default", "template": ...}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not template and (folder / "chat_template.jinja").is_file():
            origin = folder / "chat_template.jinja"
            template = origin.read_text(encoding="utf-8")
        if not isinstance(template, str) or not template.strip():
            raise ModelError(
                f"{folder} has no chat template (no 'chat_template' in tokenizer_config.json, no chat_template.jinja). "
                "Export from a chat model, or add its template to tokenizer_config.json."
            )
        chat_template = cls(template, _special_tokens(tokenizer_config), str(origin))
        chat_template.compile()
        return chat_template

    def compile(self) -> None:
        """Parse the template now, so a broken one fails at load and not at the first message."""
        import jinja2

        try:
            self._compiled = _jinja_env().from_string(self.source)
        except jinja2.TemplateError as e:
            raise ModelError(f"the chat template in {self.origin} is not valid Jinja: {e}") from None

    def render(self, messages: list[dict[str, str]]) -> str:
        import jinja2

        try:
            if self._compiled is None:
                self.compile()
            return self._compiled.render(
                messages=messages, add_generation_prompt=True, tools=None, documents=None, **self.special_tokens
            )
        except jinja2.TemplateError as e:
            # raise_exception() in a template is how a model says "this conversation is not allowed".
            raise GenerationError(f"the chat template ({self.origin}) rejected the conversation: {e}") from None


def _special_tokens(tokenizer_config: dict) -> dict[str, str]:
    """bos_token, eos_token, ... as strings; tokenizer_config.json may store them as {'content': ...}."""
    tokens = {}
    for key, value in tokenizer_config.items():
        if not key.endswith("_token"):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


def _jinja_env() -> Any:
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    # The same environment transformers uses, so templates behave identically here and in training.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers overrides jinja's tojson, which HTML-escapes, with plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
