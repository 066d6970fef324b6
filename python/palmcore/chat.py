"""Chat messages as one prompt: OpenAI's messages checked, then rendered by a chat template.

    template = ChatTemplate.from_file("template.jinja")   # or ChatTemplate() for the default
    text = template.render(check_messages(body["messages"]))

A template is a Jinja template as transformers' ``chat_template``: it sees ``messages`` (a list
of ``{"role", "content"}``, content always a string), ``add_generation_prompt`` (true: the text
ends where the assistant's reply begins), ``bos_token``, ``eos_token`` and ``raise_exception``.
It runs in Jinja's immutable sandbox, as transformers runs it. The rendered text is a prompt
like any other: palmcore never reads special tokens from text, so ``<s>`` or ``</s>`` written by
a template or a message are plain characters, never the end-of-document token.

The default template, for models trained without one: each message as ``Role: content``
followed by a blank line, then ``Assistant:``::

    System: You are terse.

    User: Hi!

    Assistant:

A reply made with the default template ends at its next turn's marker, ``"\n\nUser:"``
(:attr:`ChatTemplate.stops`; cut from the text, as a request's own ``stop`` strings are): a model
trained on such transcripts would otherwise write the user's next turn too. Other templates mark
turns their own way and get no such stop.
"""

from __future__ import annotations

import os

from palmcore.tokenizer import check_text

ROLES = ("system", "user", "assistant")

DEFAULT_TEMPLATE = ("{% for message in messages %}{{ message.role | capitalize }}: {{ message.content }}\n\n"
                    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
DEFAULT_STOPS = ("\n\nUser:",)  # where the default template's next turn begins


RUN_TEMPLATE = "chat_template.jinja"  # a run's own template: beside its checkpoint, or in the run folder
MAX_TEMPLATE_BYTES = 1 << 20


class TemplateError(ValueError):
    """A chat template that does not compile, or fails to render these messages."""


def check_messages(messages) -> list[dict]:
    """``messages`` as ``[{"role", "content"}]`` with string contents (a list of text parts is
    joined); ValueError naming the message and the field otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with role and content, got {type(message).__name__}")
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise ValueError(f"{where}: unknown or unsupported field {unknown[0]!r} (tools and function calls "
                             "are not supported)")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        if "name" in message and not isinstance(message["name"], str):
            raise ValueError(f"{where}.name must be a string, got {type(message['name']).__name__}")
        checked.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    return checked


def _content(content, where: str) -> str:
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and set(part) == {"type", "text"}
                    and isinstance(part["text"], str)):
                raise ValueError(f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": \"...\"}} "
                                 "(this server takes text only)")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ValueError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")
    return check_text(content, where)


class ChatTemplate:
    """A compiled chat template (the default one without ``source``). ``stops``: the strings that
    end a reply (the default template's next-turn marker; none for another template)."""

    def __init__(self, source: str = DEFAULT_TEMPLATE, where: str = "the default chat template",
                 bos_token: str = "<s>", eos_token: str = "</s>"):
        from jinja2 import TemplateError as JinjaError  # noqa: PLC0415
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

        self.source, self.where = source, where
        self.stops = DEFAULT_STOPS if source == DEFAULT_TEMPLATE else ()
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(source)
        except JinjaError as e:
            raise TemplateError(f"{where} is not a valid Jinja template: {e}") from None

    @classmethod
    def from_file(cls, path: str) -> ChatTemplate:
        if not os.path.isfile(path) or os.path.getsize(path) > MAX_TEMPLATE_BYTES:
            raise TemplateError(f"the chat template {path} is not a regular file of at most {MAX_TEMPLATE_BYTES} "
                                "bytes")
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise TemplateError(f"the chat template {path} cannot be read: {e}") from None
        return cls(source, f"the chat template {path}")

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of checked ``messages``; TemplateError saying why the template failed."""
        from jinja2 import TemplateError as JinjaError  # noqa: PLC0415

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._tokens)
        except _Raised as e:
            raise TemplateError(f"{self.where} refused these messages: {e}") from None
        except (JinjaError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError,
                RecursionError) as e:
            raise TemplateError(f"{self.where} failed on these messages: {type(e).__name__}: {e}") from None


def run_template(checkpoint_path: str) -> ChatTemplate | None:
    """The run's own template (RUN_TEMPLATE in the checkpoint folder, else in the run folder
    above ``checkpoints/``); None if it has none."""
    run_folder = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path)))
    for folder in (checkpoint_path, run_folder):
        if os.path.lexists(os.path.join(folder, RUN_TEMPLATE)):
            return ChatTemplate.from_file(os.path.join(folder, RUN_TEMPLATE))
    return None


class _Raised(Exception):
    pass


def _raise_exception(message):
    raise _Raised(message)
