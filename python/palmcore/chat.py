"""Chat messages as one prompt: OpenAI's messages checked, then rendered by a chat template.

    template = ChatTemplate.from_file("template.jinja")   # or ChatTemplate() for the default
    text = template.render(check_messages(body["messages"]))

A template is a Jinja template as transformers' ``chat_template``: it sees ``messages`` (a list
of ``{"role", "content"}`` and ``"name"`` where the message has one; content always a string,
text parts joined with ``"\n"`` as vLLM joins them), ``add_generation_prompt`` (true: the text
ends where the assistant's reply begins), ``bos_token`` and ``eos_token`` (both ``"</s>"``, the
end-of-document token palmcore feeds before every prompt and stops at), ``raise_exception`` and
``strftime_now``. It runs in Jinja's immutable sandbox with what transformers adds to it:
``{% break %}`` and ``{% continue %}``, ``tojson`` as ``json.dumps`` (keys in their order,
non-ASCII kept), and ``{% generation %}...{% endgeneration %}`` (transformers marks the
assistant's tokens with it for training masks; a prompt renders its body as is).

The rendered text is a prompt like any other: palmcore never reads special tokens from text, so
``<s>`` or ``</s>`` written by a template or a message are plain characters, never the
end-of-document token, with one exception: a ``bos_token`` the rendered text starts with is
dropped, since palmcore feeds that token itself (transformers would read it as the BOS token).

Rendering is bounded: it stops after ``RENDER_SECONDS`` (checked at every line of the template
it runs), its output at ``max_chars``, and ``*`` and ``**`` refuse values of more than
``MAX_VALUE_ITEMS`` items (characters, list items or bits); a MemoryError is a TemplateError.
Other ways to build a large value (string methods, format widths, ``~`` in a loop) are not
bounded: a template is the operator's code, not a client's input.

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

import datetime
import json
import os
import sys
import time

from palmcore.tokenizer import check_text

ROLES = ("system", "user", "assistant")

DEFAULT_TEMPLATE = ("{% for message in messages %}{{ message.role | capitalize }}: {{ message.content }}\n\n"
                    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
DEFAULT_STOPS = ("\n\nUser:",)  # where the default template's next turn begins


RUN_TEMPLATE = "chat_template.jinja"  # a run's own template: beside its checkpoint, or in the run folder
MAX_TEMPLATE_BYTES = 1 << 20
SPECIAL = "</s>"         # the end-of-document token's piece: the BOS palmcore feeds and the EOS it stops at
RENDER_SECONDS = 5.0     # a render's time bound: real templates take milliseconds for a 1 MiB request
MAX_RENDER_CHARS = 1 << 24   # a render's output bound when the caller gives none
MAX_VALUE_ITEMS = 1 << 24    # the largest value * and ** may make
PART_SEPARATOR = "\n"    # between a message's text parts


class TemplateError(ValueError):
    """A chat template that does not compile, or fails on these messages (the template's fault)."""


class Refused(ValueError):
    """The template refused these messages (its ``raise_exception``): the request's fault."""


class TooLong(ValueError):
    """The rendered text passed the render's ``max_chars``."""


def check_messages(messages) -> list[dict]:
    """``messages`` as ``[{"role", "content"}]`` (and ``"name"`` where given) with string contents
    (a list of text parts joined with PART_SEPARATOR); ValueError naming the message and the field
    otherwise."""
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
        named = {}
        if "name" in message:
            if not isinstance(message["name"], str):
                raise ValueError(f"{where}.name must be a string, got {type(message['name']).__name__}")
            named["name"] = check_text(message["name"], f"{where}.name")
        checked.append({"role": role, "content": _content(message.get("content"), f"{where}.content"), **named})
    return checked


def _content(content, where: str) -> str:
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and set(part) == {"type", "text"}
                    and isinstance(part["text"], str)):
                raise ValueError(f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": \"...\"}} "
                                 "(this server takes text only)")
        content = PART_SEPARATOR.join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ValueError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")
    return check_text(content, where)


class ChatTemplate:
    """A compiled chat template (the default one without ``source``). ``stops``: the strings that
    end a reply (the default template's next-turn marker; none for another template);
    ``seconds``: a render's time bound."""

    def __init__(self, source: str = DEFAULT_TEMPLATE, where: str = "the default chat template"):
        from jinja2 import TemplateError as JinjaError  # noqa: PLC0415

        self.source, self.where = source, where
        self.stops = DEFAULT_STOPS if source == DEFAULT_TEMPLATE else ()
        self.bos_token = self.eos_token = SPECIAL
        self.seconds = RENDER_SECONDS
        env = _sandbox()
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

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               max_chars: int = MAX_RENDER_CHARS) -> str:
        """The prompt text of checked ``messages`` (a leading ``bos_token`` dropped: prompt_ids feeds
        it). Refused: the template's raise_exception; TooLong: the text passed ``max_chars``;
        TemplateError: the template failed, ran past ``seconds`` or made a lone surrogate."""
        from jinja2 import TemplateError as JinjaError  # noqa: PLC0415

        pieces, size = [], 0
        previous = sys.gettrace()
        sys.settrace(_deadline(time.monotonic() + self.seconds))
        try:
            for piece in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 bos_token=self.bos_token, eos_token=self.eos_token):
                size += len(piece)
                if size > max_chars:
                    raise TooLong(f"the messages rendered by {self.where} have more than {max_chars} characters")
                pieces.append(piece)
        except TooLong:
            raise
        except _Raised as e:
            raise Refused(f"{self.where} refused these messages: {e}") from None
        except _Overtime:
            raise TemplateError(f"{self.where} ran past {self.seconds:g} s on these messages") from None
        except (JinjaError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError,
                MemoryError) as e:
            raise TemplateError(f"{self.where} failed on these messages: {type(e).__name__}: {e}") from None
        finally:
            sys.settrace(previous)
        text = "".join(pieces).removeprefix(self.bos_token)
        try:
            return check_text(text, f"the text {self.where} made")
        except ValueError as e:
            raise TemplateError(str(e)) from None


def _sandbox():
    """Jinja's immutable sandbox with transformers' additions (the module's docstring), and ``*``
    and ``**`` bounded."""
    from jinja2.ext import Extension  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if _made_items(operator, left, right) > MAX_VALUE_ITEMS:
                raise TemplateError(f"{type(left).__name__} {operator} {type(right).__name__} makes a value of "
                                    f"more than {MAX_VALUE_ITEMS} items")
            return super().call_binop(context, operator, left, right)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", Generation])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    env.filters["tojson"] = _tojson
    return env


def _made_items(operator: str, left, right) -> int:
    """The size of ``left operator right`` where it can be large: characters or items of a repeated
    sequence, bits of a power; 0 otherwise."""
    def integer(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if operator == "**" and integer(left) and integer(right) and right > 0:
        return right * max(abs(left).bit_length() - 1, 0)
    if operator == "*":
        for sequence, times in ((left, right), (right, left)):
            if isinstance(sequence, (str, list, tuple)) and integer(times):
                return len(sequence) * times
    return 0


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _deadline(deadline: float):
    """A trace function (sys.settrace) that raises _Overtime in the template's code once the clock
    passes ``deadline``. A Python thread cannot be stopped from outside, but the template is
    Python code compiled by Jinja (its frames' file is "<template>"): a trace on those frames
    checks the clock at every line they run, loops included; other frames are not traced."""
    def line(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Overtime
        return line

    def call(frame, event, arg):
        return line if frame.f_code.co_filename == "<template>" else None

    return call


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


class _Overtime(Exception):
    pass


def _raise_exception(message):
    raise _Raised(message)
