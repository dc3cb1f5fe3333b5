"""A tokenizer's own chat template (Jinja), rendered as ``transformers``' ``apply_chat_template``
renders it (same environment, filters and variables), into segments: the assistant turns
trained on, everything else context.

Which characters are the assistant's is decided in one of two ways:

- the template marks them with ``{% generation %}...{% endgeneration %}`` (what
  ``return_assistant_tokens_mask`` uses): exactly the marked text is trained on;
- otherwise, by rendering prefixes: turn i of a trained role spans from the end of the
  conversation up to it rendered with ``add_generation_prompt=True`` to the end of the
  conversation up to and including it. Each prefix must be a prefix of the whole rendering,
  else the template renders a turn differently once more follow, and it is refused.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from midtrain.errors import MidtrainError

# Private-use characters bracketing {% generation %} output in a rendering.
GEN_START, GEN_END = "\ue000", "\ue001"
_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")

Segment = tuple[str, bool]


class ChatRenderError(MidtrainError):
    """A record the template cannot render (the caller adds which record)."""


class _Generation(Extension):
    """``{% generation %}body{% endgeneration %}``: the body, bracketed by the markers."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        start = nodes.Output([nodes.TemplateData(GEN_START)], lineno=lineno)
        end = nodes.Output([nodes.TemplateData(GEN_END)], lineno=lineno)
        return [start, *body, end]


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers' tojson: no HTML escaping, unlike Jinja's own
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """One chat template: its Jinja source, where it came from (for errors) and the special
    tokens' strings it may name (``bos_token``, ``eos_token``, ...). Picklable (compiled
    lazily), so prepare's worker processes get it with their plan."""

    def __init__(self, source: str, name: str, special: dict[str, str]) -> None:
        self.source, self.name, self.special = source, name, dict(special)
        self.marked = bool(_MARKER.search(source))
        self._compiled: jinja2.Template | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_compiled": None}

    def compile(self) -> jinja2.Template:
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = _strftime_now
            try:
                self._compiled = env.from_string(self.source)
            except jinja2.TemplateSyntaxError as e:
                raise MidtrainError(
                    f"{self.name}:{e.lineno}: not a valid chat template: {e.message}"
                ) from None
        return self._compiled

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        try:
            return self.compile().render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special,
            )
        except jinja2.TemplateError as e:
            roles = ", ".join(dict.fromkeys(str(m.get("role")) for m in messages))
            raise ChatRenderError(
                f"{self.name} cannot render a conversation of roles {roles or 'none'}: "
                f"{' '.join(str(e).split()) or type(e).__name__}"
            ) from None

    def segments(self, messages: list[dict[str, Any]], train_roles: list[str]) -> list[Segment]:
        """The conversation rendered, cut into (text, trained) segments."""
        if self.marked:
            return _marked(self.render(messages))
        return self._by_prefixes(messages, train_roles)

    def _by_prefixes(self, messages: list[dict[str, Any]], train_roles: list[str]) -> list[Segment]:
        whole = self.render(messages)
        out: list[Segment] = []
        pos = 0
        for i, message in enumerate(messages):
            if message.get("role") not in train_roles:
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (whole.startswith(through) and through.startswith(before)):
                raise ChatRenderError(
                    f"{self.name} renders turn {i} ({message.get('role')}) differently once "
                    "more turns follow, so its span cannot be found by rendering prefixes; "
                    "mark the assistant text with {% generation %} ... {% endgeneration %}"
                )
            out += [(whole[pos : len(before)], False), (through[len(before) :], True)]
            pos = len(through)
        out.append((whole[pos:], False))
        return [(t, train) for t, train in out if t]


def _marked(text: str) -> list[Segment]:
    """Text with generation markers -> segments (marked text trained on)."""
    out: list[Segment] = []
    for i, part in enumerate(re.split(f"[{GEN_START}{GEN_END}]", text)):
        if part:
            out.append((part, i % 2 == 1))
    return out
