"""An OpenAI-compatible HTTP server over the continuous-batching engine (palmcore.engine).

    palmcore serve --checkpoint runs/default --port 8000

POST /v1/completions, POST /v1/chat/completions (messages rendered by a chat template, palmcore.chat),
GET /v1/models (and /v1/models/{id}), GET or HEAD /health, GET /metrics (Prometheus text). With an
API key every path but /health needs ``Authorization: Bearer KEY``. Needs the ``serve`` extra
(FastAPI, uvicorn, jinja2). Handlers only check requests, decode text and relay the engine's
tokens; the model runs on the engine's thread alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import ipaddress
import json
import os
import secrets
import sys
import time
import uuid

from palmcore import checks
from palmcore.chat import MAX_RENDER_CHARS, ChatTemplate, TemplateError, TooLong, check_messages, run_template
from palmcore.engine import Closed, Engine, QueueFull, Sequence, on_passing_thread
from palmcore.generation import sampling_settings
from palmcore.text import cut_at_stops, prompt_ids
from palmcore.tokenizer import EOD_ID, check_text

try:
    import jinja2  # noqa: F401 (palmcore.chat's templates)
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
except ImportError:  # palmcore serve says which extra to install
    FastAPI = None

_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop",
           "stop_token_ids", "seed", "n", "stream", "stream_options", "logprobs", "user"}
_CHAT_FIELDS = (_FIELDS - {"prompt", "logprobs"}) | {"messages", "max_completion_tokens"}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code


def error_response(message: str, status: int, kind: str = "invalid_request_error", param=None, code=None):
    """OpenAI's error form. A lone surrogate from a request (messages echo values with !r, which
    escapes them; a field's name is echoed as given) is shown as its escape: the JSON must be UTF-8."""
    return JSONResponse({"error": {"message": _escaped(message), "type": kind, "param": _escaped(param),
                                   "code": code}}, status_code=status)


def _escaped(text):
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(text, str) else text


class Completion:
    """One checked request, /v1/completions' or /v1/chat/completions' (``form``): its prompts as
    token ids and its sequences. ``max_prompt_chars``: a text prompt longer than this cannot fit
    the context (None: no bound known), refused before it is tokenized. Errors name the fields
    the client sent."""

    def __init__(self, body: dict, form, tokenizer, max_seq_len: int, model_name: str, max_sequences: int,
                 max_prompt_chars: int | None = None):
        unknown = sorted(set(body) - form.fields)
        if unknown:
            raise BadRequest(f"unknown or unsupported field {unknown[0]!r}", unknown[0])
        model = _string(body, "model")
        if model is not None and model != model_name:
            raise BadRequest(f"the model {model!r} does not exist; this server has {model_name!r}", "model", 404,
                             code="model_not_found")
        _string(body, "user")
        self.prompts = form.prompts(body, _TextPrompts(tokenizer, max_seq_len, max_prompt_chars, form))
        for i, p in enumerate(self.prompts):
            if any(not 0 <= t < tokenizer.vocab_size for t in p):
                raise BadRequest(f"prompt {i} holds a token id outside the vocabulary [0, {tokenizer.vocab_size})",
                                 "prompt")
        self.n = _int(body, "n", 1, 1, max_sequences)
        if self.n * len(self.prompts) > max_sequences:
            raise BadRequest(f"n × prompts is {self.n * len(self.prompts)}; this server runs at most "
                             f"{max_sequences} sequences (slots + queue)", "n")
        self.max_tokens = self._max_tokens(body, form, max_seq_len)
        self.stop = self._stops(body.get("stop")) + list(form.stops)
        stop_ids = body.get("stop_token_ids") or []
        vocab = tokenizer.vocab_size
        if not isinstance(stop_ids, list) or not all(type(t) is int and 0 <= t < vocab for t in stop_ids):
            raise BadRequest("stop_token_ids must be a list of token ids in the vocabulary", "stop_token_ids")
        self.stop_tokens = frozenset([EOD_ID, *stop_ids])
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbits(63)
        try:
            s = sampling_settings(self.max_tokens, _num(body, "temperature", 1.0), _num(body, "top_k", 0),
                                  _num(body, "top_p", 1.0), _num(body, "repetition_penalty", 1.0), (), seed)
        except (TypeError, ValueError) as e:
            raise BadRequest(str(e), str(e).split(" ")[0]) from None
        self.sampling = {k: s[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")}
        self.stream = _bool("stream", body.get("stream"))
        options = body.get("stream_options")
        if options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed with stream: true", "stream_options")
        if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
            raise BadRequest("stream_options may hold only include_usage", "stream_options")
        self.include_usage = _bool("stream_options.include_usage", (options or {}).get("include_usage"))
        logprobs = body.get("logprobs")
        self.logprobs = None if logprobs is None else _int(body, "logprobs", 0, 0, 5)

    def _max_tokens(self, body: dict, form, max_seq_len: int) -> int:
        """The tokens to make: the client's max_completion_tokens or max_tokens, else the form's
        default (None: as many as fit the context after the longest prompt)."""
        field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        if field == "max_completion_tokens" and body.get("max_tokens") is not None:
            raise BadRequest("give max_completion_tokens or max_tokens, not both", "max_completion_tokens")
        given = body.get(field) is not None
        room = max_seq_len - max(len(p) for p in self.prompts)
        max_tokens = _int(body, field, form.max_tokens or max(room, 1), 1, max_seq_len)
        for i, p in enumerate(self.prompts):
            if len(p) + max_tokens > max_seq_len:
                rest = (f"and {field} is {max_tokens}{'' if given else ' (the default)'}" if given or form.max_tokens
                        else "which leaves no room for a reply")
                raise BadRequest(f"this model's maximum context length is {max_seq_len} tokens; "
                                 f"{form.prompt_name(i)} has {len(p)} tokens {rest}", form.prompt_field,
                                 code="context_length_exceeded")
        return max_tokens

    @staticmethod
    def _stops(stop) -> list[str]:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", "stop")
        try:
            return [check_text(s, "stop") for s in stops]
        except ValueError as e:
            raise BadRequest(str(e), "stop") from None


def _prompts(prompt, text_ids) -> list[list[int]]:
    """/v1/completions' prompt as token ids."""
    if isinstance(prompt, str):
        return text_ids([prompt])
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return text_ids(prompt)
    if (isinstance(prompt, list) and prompt and
            all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt)):
        return prompt
    raise BadRequest("prompt must be a string, a list of strings, a list of token ids or a list of "
                     "token-id lists (none empty)", "prompt")


class _TextPrompts:
    """Text prompts' token ids; a text too long for the context is refused before any is
    tokenized (tokenizing takes about 45 bytes of memory per character)."""

    def __init__(self, tokenizer, max_seq_len: int, max_chars: int | None, form):
        self.tokenizer, self.max_seq_len, self.max_chars, self.form = tokenizer, max_seq_len, max_chars, form

    def __call__(self, texts: list[str]) -> list[list[int]]:
        for i, text in enumerate(texts):
            if self.max_chars is not None and len(text) > self.max_chars:
                raise BadRequest(f"{self.form.prompt_name(i)} has {len(text)} characters; this model's maximum "
                                 f"context length is {self.max_seq_len} tokens of at most "
                                 f"{self.max_chars // self.max_seq_len} characters each, so a prompt of more than "
                                 f"{self.max_chars} characters cannot fit", self.form.prompt_field,
                                 code="context_length_exceeded")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest(f"{self.form.prompt_name(i)} is not valid UTF-8 (it holds a lone surrogate)",
                                 self.form.prompt_field) from None
        return [prompt_ids(self.tokenizer, text) for text in texts]


def _string(body: dict, name: str) -> str | None:
    """A string field (None: absent), valid UTF-8."""
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, got {type(value).__name__}", name)
    try:
        return None if value is None else check_text(value, name)
    except ValueError as e:
        raise BadRequest(str(e), name) from None


def _bool(name: str, value) -> bool:
    """A boolean field's value (None: absent, false)."""
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {value!r}", name)
    return bool(value)


def _int(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        value = default
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer in [{low}, {high}], got {value!r}", name)
    return value


def _num(body: dict, name: str, default):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name} must be a number, got {value!r}", name)
    return value


class Choice:
    """One sequence's text as its tokens arrive: whole characters, held back while they may
    begin a stop string, cut at the first stop string."""

    def __init__(self, index: int, tokenizer, stops: list[str], stop_tokens: frozenset, logprobs: int | None):
        self.index, self.tokenizer, self.stops, self.stop_tokens = index, tokenizer, stops, stop_tokens
        self.tokens: list[int] = []
        self.made = 0         # tokens received until it ended: its text's and the stop token that ended it
        self.text = ""        # decoded so far (whole characters)
        self.sent = 0         # characters of text already given out
        self.finish = None
        self.logprobs = logprobs
        self.lp = {"tokens": [], "token_logprobs": [], "top_logprobs": []}

    def add(self, token: int, log_probs) -> None:
        self.made += 1
        if log_probs is not None:
            self.lp["tokens"].append(self.tokenizer.decode([token]))
            self.lp["token_logprobs"].append(float(log_probs[token]))
            if self.logprobs:
                top = log_probs.argsort()[::-1][:self.logprobs]
                self.lp["top_logprobs"].append({self.tokenizer.decode([int(t)]): float(log_probs[t]) for t in top})
        if token in self.stop_tokens:  # ends the text, is not part of it
            return
        self.tokens.append(token)
        decoded = self.tokenizer.decode(self.tokens)
        if not decoded.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.text = decoded
        cut = cut_at_stops(self.text, self.stops)
        if len(cut) < len(self.text):
            self.text, self.finish = cut, "stop"

    def end(self, reason: str) -> None:
        if self.finish is None:
            self.text = self.tokenizer.decode(self.tokens)
            self.finish = reason

    def take(self) -> str:
        """Text that can be given out now."""
        hold = 0 if self.finish else max((len(s) - 1 for s in self.stops), default=0)
        upto = max(self.sent, len(self.text) - hold)
        piece, self.sent = self.text[self.sent:upto], upto
        return piece

    def logprobs_since(self, start: int):
        if self.logprobs is None:
            return None
        return {k: v[start:] for k, v in self.lp.items()}


class TextForm:
    """/v1/completions: prompts as texts or token ids, choices as texts; max_tokens 16 by default,
    as OpenAI's."""
    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"
    fields, prompt_field, max_tokens, stops = _FIELDS, "prompt", 16, ()

    def prompts(self, body: dict, text_ids) -> list[list[int]]:
        return _prompts(body.get("prompt"), text_ids)

    def prompt_name(self, i: int) -> str:
        return f"prompt {i}"

    def choice(self, c: Choice) -> dict:
        return {"index": c.index, "text": c.text, "logprobs": c.logprobs_since(0), "finish_reason": c.finish}

    def opening(self, choices: list[Choice]) -> list[dict]:
        return []

    def delta(self, c: Choice, piece: str, start: int) -> dict | None:
        if piece or c.finish or c.logprobs is not None:
            return {"index": c.index, "text": piece, "logprobs": c.logprobs_since(start), "finish_reason": c.finish}
        return None


class ChatForm:
    """/v1/chat/completions: the messages rendered by a chat template into one prompt; choices as
    assistant messages, streamed as deltas (the role, then the content, then the finish reason);
    max_tokens by default as many as fit the context (OpenAI's chat default). A template's
    failure (palmcore.chat.TemplateError) is the server's: it reaches the 500 handler."""
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"
    fields, prompt_field, max_tokens = _CHAT_FIELDS, "messages", None

    def __init__(self, template: ChatTemplate):
        self.template, self.stops = template, template.stops

    def prompts(self, body: dict, text_ids) -> list[list[int]]:
        # rendering stops where the text can no longer fit the context (text_ids would refuse it)
        max_chars = text_ids.max_chars or MAX_RENDER_CHARS
        try:
            prompt = self.template.render(check_messages(body.get("messages")), max_chars=max_chars)
        except TooLong as e:
            raise BadRequest(f"{e}: more than a prompt can have here (this model's maximum context length is "
                             f"{text_ids.max_seq_len} tokens)", "messages", code="context_length_exceeded") from None
        except TemplateError:  # the template's own failure: a 500
            raise
        except ValueError as e:  # the messages, or the template's raise_exception
            raise BadRequest(str(e), "messages") from None
        return text_ids([prompt])

    def prompt_name(self, i: int) -> str:
        return "the conversation as the chat template renders it"

    def choice(self, c: Choice) -> dict:
        return {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                "finish_reason": c.finish}

    def opening(self, choices: list[Choice]) -> list[dict]:
        return [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for c in choices]

    def delta(self, c: Choice, piece: str, start: int) -> dict | None:
        if piece or c.finish:
            return {"index": c.index, "delta": {"content": piece} if piece else {}, "logprobs": None,
                    "finish_reason": c.finish}
        return None


class RequireKey:
    """ASGI middleware: every path but /health needs ``Authorization: Bearer KEY`` (compared in
    constant time); otherwise 401 in OpenAI's format."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode("ascii")

    def allows(self, headers) -> bool:
        given = [v for k, v in headers if k.lower() == b"authorization"]
        scheme, _, token = given[0].strip().partition(b" ") if len(given) == 1 else (b"", b"", b"")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            if not self.allows(scope["headers"]):
                response = error_response("a valid API key is required: send the header 'Authorization: Bearer "
                                          "KEY'", 401, code="invalid_api_key")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_api_key(key: str) -> str:
    """``key`` if it can travel in an Authorization header: non-empty printable ASCII, no spaces."""
    if not isinstance(key, str) or not key or not all("!" <= ch <= "~" for ch in key):
        raise ValueError("the API key must be a non-empty string of printable ASCII characters without spaces")
    return key


# A request body's bound. A prompt that fits a context is far smaller: 2,048 tokens of text are
# tens of KB, as token ids about 15 KB; 1 MiB leaves room for a list of prompts or a long chat
# while parsing one request stays within tens of MB (a JSON value costs Python about 50 bytes).
MAX_REQUEST_BYTES = 1 << 20


def make_app(model, tokenizer, model_name: str, slots: int = 16, queue: int = 64,
             chat_template: ChatTemplate | None = None, api_key: str | None = None,
             max_request_bytes: int = MAX_REQUEST_BYTES):
    """The server's ASGI app. ``chat_template``: how /v1/chat/completions renders messages (None:
    palmcore.chat's default); ``api_key``: the key requests must carry (None: none); a request
    body over ``max_request_bytes`` gets 413."""
    if FastAPI is None:
        raise RuntimeError("palmcore serve needs FastAPI and uvicorn: pip install 'palmcore[serve]'")
    if api_key is not None:
        check_api_key(api_key)
    checks.integer("max_request_bytes", max_request_bytes, 1)
    text_form, chat_form = TextForm(), ChatForm(chat_template or ChatTemplate())
    max_seq_len = model.config.max_seq_len
    token_chars = tokenizer.max_token_chars()
    max_prompt_chars = None if token_chars is None else token_chars * max_seq_len
    engine = Engine(model, slots, queue)
    # Parsing, rendering and tokenizing a request run here, off the event loop: a large request
    # does not hold up the others (or /health).
    preparing = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="palmcore-prepare")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        preparing.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(engine.close)  # after uvicorn's graceful shutdown: drain, then stop

    app = FastAPI(title="palmcore", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    if api_key is not None:
        app.add_middleware(RequireKey, key=api_key)
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # an unknown path (404), a wrong method (405)
        response = error_response(f"{e.detail}: {request.method} {request.url.path}", e.status_code,
                                  code="not_found" if e.status_code == 404 else None)
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(Exception)
    async def server_error(_request, e: Exception):  # a bug: the log has its traceback
        return error_response(f"internal server error: {type(e).__name__}: {e}", 500, "server_error")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok"}

    card = {"id": model_name, "object": "model", "created": created, "owned_by": "palmcore"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            return error_response(f"the model {name!r} does not exist; this server has {model_name!r}", 404,
                                  param="model", code="model_not_found")
        return card

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(engine), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, text_form)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, chat_form)

    def prepare(raw: bytes, form) -> Completion:
        """The checked request of a body (on a thread of ``preparing``)."""
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest("the request body is not valid UTF-8") from None
        except ValueError as e:  # JSONDecodeError, or an integer of more digits than Python converts
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise BadRequest("the request body nests arrays or objects too deeply") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return Completion(body, form, tokenizer, max_seq_len, model_name, slots + queue, max_prompt_chars)

    async def respond(request: Request, form):
        loop = asyncio.get_running_loop()
        try:
            raw = await read_body(request, max_request_bytes)
            req = await loop.run_in_executor(preparing, prepare, raw, form)
        except BadRequest as e:
            return error_response(str(e), e.status, e.kind, e.param, e.code)
        except ClientDisconnect:  # gone before its body was whole
            return _gone()
        events: asyncio.Queue = asyncio.Queue()
        sequences, choices = [], []
        for p, prompt in enumerate(req.prompts):
            for row in range(req.n):
                index = p * req.n + row

                def emit(kind, value, index=index):
                    loop.call_soon_threadsafe(events.put_nowait, (index, kind, value))

                sequences.append(Sequence(prompt, req.max_tokens, req.sampling, req.stop_tokens, row, emit,
                                          logprobs=req.logprobs is not None))
                choices.append(Choice(index, tokenizer, req.stop, req.stop_tokens, req.logprobs))
        try:
            engine.submit(sequences)
        except QueueFull as e:
            return error_response(str(e), 429, "rate_limit_exceeded", code="rate_limit_exceeded")
        except Closed as e:
            return error_response(str(e), 503, "server_error", code="service_unavailable")
        head = {"id": f"{form.prefix}-{uuid.uuid4().hex}", "object": form.object, "created": int(time.time()),
                "model": model_name}

        def usage():  # the tokens of the texts returned (the engine may have made more before a stop landed)
            prompt, made = sum(len(p) for p in req.prompts), sum(c.made for c in choices)
            return {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made}

        async def updates():
            """(choice, new text, logprobs start) as tokens arrive, until every choice ends."""
            running = len(choices)
            while running:
                index, kind, value = await events.get()
                c = choices[index]
                if c.finish is not None:
                    continue
                if kind == "error":
                    engine.cancel(sequences)
                    raise RuntimeError(value)
                start = len(c.lp["token_logprobs"])
                if kind == "token":
                    c.add(*value)
                    if c.finish is not None:  # a stop string: the sequence need not go on
                        engine.cancel([sequences[index]], "stop")
                else:
                    c.end(value)
                if c.finish is not None:
                    running -= 1
                yield c, start

        if not req.stream:
            async def finish():
                async for _ in updates():
                    pass

            finished, gone = asyncio.ensure_future(finish()), asyncio.ensure_future(disconnect(request))
            try:
                await asyncio.wait((finished, gone), return_when=asyncio.FIRST_COMPLETED)
                if not finished.done():
                    return _gone()
                finished.result()
            except RuntimeError as e:
                return error_response(str(e), 500, "server_error")
            finally:
                finished.cancel()
                gone.cancel()
                engine.cancel(sequences)  # a client gone before the end frees its slots
            return {**head, "choices": [form.choice(c) for c in choices], "usage": usage()}

        async def stream():
            chunk_head = {**head, "object": form.chunk_object}
            try:
                for opening in form.opening(choices):
                    yield f"data: {json.dumps({**chunk_head, 'choices': [opening]})}\n\n"
                async for c, start in updates():
                    delta = form.delta(c, c.take(), start)
                    if delta is not None:
                        yield f"data: {json.dumps({**chunk_head, 'choices': [delta]})}\n\n"
                if req.include_usage:
                    yield f"data: {json.dumps({**chunk_head, 'choices': [], 'usage': usage()})}\n\n"
                yield "data: [DONE]\n\n"
            except RuntimeError as e:
                error = {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(error)}\n\n"
            finally:
                engine.cancel(sequences)  # a disconnect lands here: the slots are freed

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def _gone() -> Response:
    """The answer to a client that went away (nobody reads it)."""
    return Response(status_code=499)


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, or BadRequest 413 as soon as it is known to exceed ``limit`` bytes:
    from Content-Length before reading, else (a chunked upload) while reading."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> BadRequest:
    return BadRequest(f"the request body is larger than this server's limit of {limit} bytes "
                      "(palmcore serve --max-request-bytes)", status=413, code="request_too_large")


async def disconnect(request: Request) -> None:
    """Returns when the client goes away (the body already read, the next message uvicorn
    gives is http.disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def prometheus(engine: Engine) -> str:
    m = engine.metrics
    lines = ["# HELP palmcore_sequences_total Sequences (choices) by outcome.",
             "# TYPE palmcore_sequences_total counter"]
    for outcome in m.OUTCOMES:
        lines.append(f'palmcore_sequences_total{{outcome="{outcome}"}} {m.sequences[outcome]}')
    lines += ["# TYPE palmcore_prompt_tokens_total counter", f"palmcore_prompt_tokens_total {m.prompt_tokens}",
              "# TYPE palmcore_generated_tokens_total counter",
              f"palmcore_generated_tokens_total {m.generated_tokens}",
              "# TYPE palmcore_queue_length gauge", f"palmcore_queue_length {engine.queue_length}",
              "# TYPE palmcore_slots_busy gauge", f"palmcore_slots_busy {engine.busy_slots}",
              "# TYPE palmcore_slots gauge", f"palmcore_slots {engine.slots}",
              "# HELP palmcore_tokens_per_second Tokens made per second over the last 10 s.",
              "# TYPE palmcore_tokens_per_second gauge",
              f"palmcore_tokens_per_second {m.tokens_per_second():.3f}",
              "# HELP palmcore_time_to_first_token_seconds From queueing to the first token.",
              "# TYPE palmcore_time_to_first_token_seconds histogram"]
    for edge, count in zip(m.TTFT_BUCKETS, m.ttft_buckets):
        lines.append(f'palmcore_time_to_first_token_seconds_bucket{{le="{edge}"}} {count}')
    lines += [f'palmcore_time_to_first_token_seconds_bucket{{le="+Inf"}} {m.ttft_count}',
              f"palmcore_time_to_first_token_seconds_sum {m.ttft_sum:.6f}",
              f"palmcore_time_to_first_token_seconds_count {m.ttft_count}"]
    return "\n".join(lines) + "\n"


def serve(checkpoint_path: str, host: str = "127.0.0.1", port: int = 8000, slots: int = 16, queue: int = 64,
          device: str = "cpu", precision: str = "fp32", chat_template: str | None = None,
          api_key: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
          shutdown_timeout: float = 30.0, weights: str = "fp32") -> None:
    """Serve a checkpoint until SIGINT/SIGTERM: uvicorn stops accepting, waits up to
    ``shutdown_timeout`` seconds for the requests in flight, then cancels those still running (a
    client sending its body slowly, a stream nobody reads), the engine stops, and uvicorn
    re-raises the signal (the process ends by it). ``chat_template``: a Jinja file (default: the
    run's chat_template.jinja, else palmcore.chat's default); ``api_key``: required of every
    request (default: $PALMCORE_API_KEY, if set); ``weights``: compact decode weights
    (PaLM.set_weights)."""
    if FastAPI is None:
        raise RuntimeError("palmcore serve needs FastAPI and uvicorn: pip install 'palmcore[serve]'")
    from palmcore.text import load  # noqa: PLC0415

    checks.real("shutdown_timeout", shutdown_timeout, low=0.0)
    api_key = resolve_api_key(api_key, host)
    template = ChatTemplate.from_file(chat_template) if chat_template is not None else None
    model, tokenizer = on_passing_thread(load, checkpoint_path, device, precision, weights)
    template = template or run_template(os.path.dirname(tokenizer.model_path))
    name = os.path.basename(os.path.normpath(checkpoint_path))
    uvicorn.run(make_app(model, tokenizer, name, slots, queue, template, api_key, max_request_bytes), host=host,
                port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)


def resolve_api_key(api_key: str | None, host: str) -> str | None:
    """The key to require: ``api_key``, else $PALMCORE_API_KEY, else None, with a warning on stderr
    when ``host`` reaches beyond loopback without one."""
    if api_key is None and "PALMCORE_API_KEY" in os.environ:
        try:
            api_key = check_api_key(os.environ["PALMCORE_API_KEY"])
        except ValueError as e:
            raise ValueError(f"PALMCORE_API_KEY: {e}") from None
    elif api_key is not None:
        check_api_key(api_key)
    if api_key is None and not _loopback(host):
        print(f"palmcore serve: warning: listening on {host} without an API key: anyone who can reach it can use "
              "it (--api-key or PALMCORE_API_KEY)", file=sys.stderr)
    return api_key


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False

