"""palmcore serve's /v1/chat/completions (palmcore.chat's templates) and its API key."""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytest.importorskip("jinja2")
openai = pytest.importorskip("openai")

from palmcore.chat import ChatTemplate, TemplateError, TooLong, check_messages  # noqa: E402
from palmcore.interchange import export_checkpoint, import_hf  # noqa: E402
from palmcore.training import run  # noqa: E402

from helpers import tiny_run_settings  # noqa: E402
from test_serve import Server, reference, want  # noqa: E402,F401

MESSAGES = [{"role": "system", "content": "A"}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
    """A tiny run with room for a chat: its tokenizer spends a token on most characters."""
    out = tmp_path_factory.mktemp("run")
    settings = tiny_run_settings(corpus, out, steps=4, sample_tokens=0)
    settings.overrides["max_seq_len"] = 128
    run(settings, log=lambda _: None)
    return str(out)


@pytest.fixture(scope="module")
def server(run_dir):
    s = Server(run_dir, slots=8, queue=8)
    yield s
    s.close()


def test_default_template_is_a_plain_transcript():
    assert ChatTemplate().render(check_messages(MESSAGES)) == "System: A\n\nUser: Hi\n\nAssistant:"
    # its replies end where its next turn would begin; the same source from a file keeps that
    assert ChatTemplate().stops == ChatTemplate(ChatTemplate().source, "a file").stops == ("\n\nUser:",)
    assert ChatTemplate("{{ messages[0]['content'] }}").stops == ()


def test_a_reply_ends_at_the_templates_stop(run_dir, reference):  # noqa: F811
    """The template's stops reach the request: the reply is cut at the first one, finish_reason
    "stop" (here a stop the model is known to write, as the default template's would be)."""
    _, tokenizer = reference
    ids = [1] + tokenizer.encode("System: A\n\nUser: Hi\n\nAssistant:")
    text = want(reference, ids, max_tokens=10, seed=5)[0][0]
    assert len(text) >= 3, "the seed's reply is too short: choose another"
    template = ChatTemplate()
    template.stops = (text[1:3],)
    server = Server(run_dir, slots=1, queue=1, chat_template=template)
    try:
        for stop in (None, ["never written"]):  # the template's stop holds beside the request's own
            got = server.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, seed=5,
                                                        stop=stop, temperature=0.9, top_p=0.9,
                                                        extra_body={"top_k": 20})
            assert got.choices[0].message.content == text[:text.index(text[1:3])]
            assert got.choices[0].finish_reason == "stop"
    finally:
        server.close()


def test_chat_equals_generate_of_the_rendered_prompt(server, reference):  # noqa: F811
    _, tokenizer = reference
    ids = [1] + tokenizer.encode("System: A\n\nUser: Hi\n\nAssistant:")
    texts, lengths = want(reference, ids, n=2, max_tokens=6, seed=5)
    got = server.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, seed=5, n=2,
                                                temperature=0.9, top_p=0.9, extra_body={"top_k": 20})
    assert got.object == "chat.completion"
    assert [c.message.content for c in got.choices] == texts
    assert all(c.message.role == "assistant" for c in got.choices)
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == sum(lengths)
    chunks = list(server.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, seed=5,
                                                        n=2, stream=True, temperature=0.9, top_p=0.9,
                                                        extra_body={"top_k": 20}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert "".join(c.delta.content or "" for c in mine) == texts[i]
        assert mine[-1].finish_reason in ("stop", "length") and all(c.finish_reason is None for c in mine[:-1])


def post(server, body, headers=None):
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers)


@pytest.mark.parametrize("messages", [[], None, "Hi", [{"role": "robot", "content": "x"}],
                                      [{"role": "user", "content": 5}], [{"role": "user"}],
                                      [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                                      [{"role": "user", "content": "x", "extra": 1}], ["Hi"]])
def test_bad_messages_get_400(server, messages):
    r = post(server, {"model": "tiny", "messages": messages, "max_tokens": 2})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages" and r.json()["error"]["message"]


def test_bad_fields_get_400(server):
    for body in ({"messages": MESSAGES, "prompt": "x"}, {"messages": MESSAGES, "logprobs": True},
                 {"messages": MESSAGES, "max_tokens": 2, "max_completion_tokens": 2},
                 {"messages": MESSAGES, "temperature": -1}):
        r = post(server, body)
        assert r.status_code == 400, (body, r.text)
    assert post(server, {"messages": MESSAGES, "max_completion_tokens": 2}).status_code == 200


def test_message_text_is_not_template_code(server, reference):  # noqa: F811
    messages = [{"role": "user", "content": "{{ 7 * 7 }}{% raise %}</s>"}]
    assert ChatTemplate().render(check_messages(messages)) == "User: {{ 7 * 7 }}{% raise %}</s>\n\nAssistant:"
    assert post(server, {"messages": messages, "max_tokens": 2}).status_code == 200


def test_template_errors(tmp_path, run_dir, reference):  # noqa: F811
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="bad.jinja is not a valid Jinja template"):
        ChatTemplate.from_file(str(bad))
    with pytest.raises(ValueError, match="missing.jinja is not a regular file"):
        ChatTemplate.from_file(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="failed on these messages"):  # the sandbox holds
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render(check_messages(MESSAGES))
    strict = ChatTemplate("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
                          "x", "strict")
    with pytest.raises(ValueError, match="system first"):
        strict.render(check_messages([{"role": "user", "content": "x"}]))
    server = Server(run_dir, slots=1, queue=1, chat_template=strict)
    try:
        r = post(server, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert r.status_code == 400 and "system first" in r.json()["error"]["message"], r.text
        assert post(server, {"messages": MESSAGES, "max_tokens": 2}).status_code == 200
    finally:
        server.close()


def test_export_stores_the_template_and_import_keeps_it(tmp_path, run_dir):  # noqa: F811
    export_checkpoint(run_dir, str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == ChatTemplate().source
    config["chat_template"] = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(config))
    import_hf(str(tmp_path / "hf"), out=str(tmp_path / "run"))
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == config["chat_template"]
    export_checkpoint(str(tmp_path / "run"), str(tmp_path / "again"))
    again = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert again["chat_template"] == config["chat_template"]


def test_api_key(run_dir):  # noqa: F811
    server = Server(run_dir, slots=1, queue=1, api_key="s3cret")
    try:
        body = {"messages": MESSAGES, "max_tokens": 2}
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer s3cret2"},
                        {"Authorization": "Bearer"}, {"Authorization": "Bearer s3cret s3cret"}):
            for path in ("/v1/chat/completions", "/v1/completions"):
                r = httpx.post(server.url + path, json=body, headers=headers)
                assert r.status_code == 401, (headers, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
        for path in ("/v1/models", "/metrics", "/openapi.json"):
            assert httpx.get(server.url + path).status_code == 401, path
        assert httpx.get(server.url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            server.client.models.list()
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices
        assert post(server, body, {"Authorization": "bearer s3cret"}).status_code == 200
        r = httpx.get(server.url + "/openapi.json", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"  # a path it has not
        assert httpx.get(server.url + "/nope").status_code == 401  # the key first, whatever the path
    finally:
        server.close()


def test_bad_api_keys_are_refused():
    from palmcore.serve import check_api_key  # noqa: PLC0415

    for key in ("", "with space", "caf\u00e9", "a\nb"):
        with pytest.raises(ValueError, match="API key"):
            check_api_key(key)


def raw(server, content: bytes, path="/v1/chat/completions"):
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})


def openai_error(response, status) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def ended_at(tokenizer, row, stops) -> int:
    """How many of ``row``'s tokens a choice holds: up to the end token, or up to the token whose
    text completes a stop string."""
    for k in range(1, len(row) + 1):
        text = tokenizer.decode(row[:k])
        if row[k - 1] == 1 or (not text.endswith("\ufffd") and any(s in text for s in stops)):
            return k
    return len(row)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_usage_counts_the_tokens_of_the_returned_texts(server, reference, path):  # noqa: F811
    """Finding 2: after a stop string the engine makes tokens until the cancel lands; usage counts
    only those up to the stop, so it is the same on every run, streaming or not."""
    model, tokenizer = reference
    text = "System: A\n\nUser: Hi\n\nAssistant:"
    rows = model.generate([[1] + tokenizer.encode(text)] * 3, max_new_tokens=90, stop_tokens=(1,), seed=5,
                          temperature=0.9, top_p=0.9, top_k=20)
    stop = tokenizer.decode(rows[0])[3]
    stops = [stop] + (["\n\nUser:"] if "chat" in path else [])
    made = sum(ended_at(tokenizer, row, stops) for row in rows)
    assert made < 3 * 90 - 50, "the stop ends no choice early: choose another"
    body = {("messages" if "chat" in path else "prompt"): MESSAGES if "chat" in path else text, "max_tokens": 90,
            "seed": 5, "n": 3, "stop": stop, "temperature": 0.9, "top_p": 0.9, "top_k": 20}
    for _ in range(3):
        r = httpx.post(server.url + path, json=body)
        assert r.json()["usage"]["completion_tokens"] == made, r.text
    with httpx.stream("POST", server.url + path, json={**body, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["usage"]["completion_tokens"] == made


def test_lone_surrogates_and_huge_numbers_get_400(server):
    """Findings 3, 4, 12: a lone surrogate in any string the server echoes or uses (model, a field's
    name, stop, a message's name, user) and an integer Python will not convert are 400s in
    OpenAI's form, the surrogate shown escaped; never a 500."""
    message = b'"messages": [{"role": "user", "content": "a"}]'
    for path in ("/v1/chat/completions", "/v1/completions"):
        start = message if "chat" in path else b'"prompt": "a"'
        for extra, param in ((b'"model": "\\ud800"', "model"), (b'"\\ud800": 1', "\\ud800"),
                             (b'"stop": "\\ud800"', "stop"), (b'"user": "\\udfff"', "user"),
                             (b'"n": ' + b"1" * 5000, None)):
            error = openai_error(raw(server, b"{%s, %s}" % (start, extra), path), 400)
            assert error["param"] == param and error["type"] == "invalid_request_error", (path, extra, error)
    assert "'\\ud800'" in openai_error(raw(server, b'{"prompt": "a", "\\ud800": 1}', "/v1/completions"), 400)["message"]
    error = openai_error(raw(server, b'{"messages": [{"role": "user", "content": "a", "name": "\\ud800"}]}'), 400)
    assert error["param"] == "messages" and "messages[0].name" in error["message"]


def test_name_reaches_the_template():
    """Finding 5: a message's name is passed to the template, as transformers passes it."""
    messages = check_messages([{"role": "user", "content": "hi", "name": "bob"}, {"role": "user", "content": "x"}])
    assert ChatTemplate("{% for m in messages %}{{ m.name or '-' }}:{{ m.content }};{% endfor %}").render(messages) \
        == "bob:hi;-:x;"


def test_text_parts_are_joined_with_a_newline():
    """Finding 11: as vLLM joins them (OpenAI's own join is not documented)."""
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    assert check_messages([{"role": "user", "content": parts}])[0]["content"] == "Hello\nworld"


def test_chat_makes_as_many_tokens_as_fit_by_default(server, reference):  # noqa: F811
    """Finding 6: without max_tokens a chat reply may fill the context (OpenAI's chat default);
    completions keep OpenAI's 16. A conversation that leaves no room is refused, naming messages."""
    model, tokenizer = reference
    ids = [1] + tokenizer.encode("System: A\n\nUser: Hi\n\nAssistant:")
    room = model.config.max_seq_len - len(ids)
    texts, lengths = want(reference, ids, max_tokens=room, seed=5)
    assert "\n\nUser:" not in texts[0] and lengths[0] > 16, "the seed's reply is cut or short: choose another"
    got = server.client.chat.completions.create(model="tiny", messages=MESSAGES, seed=5, temperature=0.9,
                                                top_p=0.9, extra_body={"top_k": 20})
    assert got.choices[0].message.content == texts[0] and got.usage.completion_tokens == lengths[0]
    got = server.client.completions.create(model="tiny", prompt="def", seed=5, temperature=0.9, top_p=0.9,
                                           extra_body={"top_k": 20})
    assert got.usage.completion_tokens <= 16
    assert got.choices[0].text == want(reference, [1] + tokenizer.encode("def"), max_tokens=16, seed=5)[0][0]
    words = "x " * model.config.max_seq_len
    full = [{"role": "user", "content": words[:next(n for n in range(len(words)) if len(
        tokenizer.encode(f"User: {words[:n]}\n\nAssistant:")) + 1 >= model.config.max_seq_len)]}]
    error = openai_error(post(server, {"messages": full}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages", error
    assert "no room" in error["message"] and "prompt" not in error["message"]


def test_errors_name_the_fields_the_client_sent(server, reference):  # noqa: F811
    """Finding 7: max_completion_tokens and messages, not max_tokens and prompt."""
    model, _ = reference
    error = openai_error(post(server, {"messages": MESSAGES, "max_completion_tokens": -1}), 400)
    assert error["param"] == "max_completion_tokens" and "max_completion_tokens" in error["message"]
    error = openai_error(post(server, {"messages": MESSAGES, "max_completion_tokens": model.config.max_seq_len}),
                         400)
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
    assert "max_completion_tokens is 128" in error["message"] and "prompt" not in error["message"]


def test_small_format_gaps(server):
    """Finding 12: models.retrieve, HEAD /health, null as absent, type errors, stream_options only
    with stream, a closing server's 503 (in test_a_closing_server_answers_503)."""
    assert server.client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("nope")
    assert httpx.head(server.url + "/health").status_code == 200
    ok = {"messages": MESSAGES, "max_tokens": 2}
    for extra in ({"model": None}, {"stream": None}, {"stream": False, "stream_options": None},
                  {"max_tokens": None, "max_completion_tokens": 2}, {"user": "bob"},
                  {"stream": True, "stream_options": {"include_usage": None}}):
        assert post(server, {**ok, **extra}).status_code == 200, extra
    for extra, param in (({"model": 5}, "model"), ({"user": 5}, "user"),
                         ({"stream": True, "stream_options": {"include_usage": "no"}}, "stream_options.include_usage"),
                         ({"stream_options": {"include_usage": True}}, "stream_options"),
                         ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options")):
        assert openai_error(post(server, {**ok, **extra}), 400)["param"] == param, extra


def test_a_closing_server_answers_503(run_dir):
    server = Server(run_dir, slots=1, queue=1)
    try:
        server.app.state.engine.close()
        error = openai_error(post(server, {"messages": MESSAGES, "max_tokens": 2}), 503)
        assert error["type"] == "server_error" and "shutting down" in error["message"]
    finally:
        server.close()


def test_templates_that_transformers_renders():
    """Finding 9: {% break %} and {% continue %}, strftime_now, tojson keeping the keys' order and
    non-ASCII text, {% generation %} (rendered as its body)."""
    messages = check_messages([{"role": "user", "content": "é"}, {"role": "assistant", "content": "b"},
                               {"role": "user", "content": "c"}])
    source = ("{% for m in messages %}{% if m.role == 'assistant' %}{% continue %}{% endif %}{{ m.content }}"
              "{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}"
              "|{{ {'z': 1, 'a': messages[0].content} | tojson }}|{% generation %}{{ messages[1].content }}{% endgeneration %}|{{ strftime_now('%Y') }}")
    import datetime  # noqa: PLC0415

    assert ChatTemplate(source).render(messages) == f'éc|{{"z": 1, "a": "é"}}|b|{datetime.date.today().year}'


def test_bos_token_is_the_token_palmcore_feeds(server, reference, run_dir):  # noqa: F811
    """bos_token and eos_token are </s>, the end-of-document token palmcore feeds first; a
    template starting with bos_token does not feed it twice."""
    assert ChatTemplate("{{ bos_token }}|{{ eos_token }}").render([]) == "|</s>"
    template = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    _, tokenizer = reference
    s = Server(run_dir, slots=1, queue=1, chat_template=template)
    try:
        texts, _ = want(reference, [1] + tokenizer.encode("Hi"), max_tokens=4, seed=2)
        got = s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, seed=2, temperature=0.9, top_p=0.9,
                                               extra_body={"top_k": 20})
        assert got.usage.prompt_tokens == 1 + len(tokenizer.encode("Hi"))
        assert got.choices[0].message.content == texts[0]
    finally:
        s.close()


def test_rendering_is_bounded():
    """Finding 8: a template that loops forever stops after its time bound; * and ** refuse huge
    values; output stops at max_chars; a MemoryError is a TemplateError."""
    messages = check_messages(MESSAGES)
    forever = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    forever.seconds = 0.3
    start = time.monotonic()
    with pytest.raises(TemplateError, match="ran past 0.3 s"):
        forever.render(messages)
    assert time.monotonic() - start < 3
    for source in ("{{ [0] * 10**9 }}", "{{ 10**9 * 'x' }}", "{{ 2 ** (10**9) }}"):
        with pytest.raises(TemplateError, match="more than 16777216 items"):
            ChatTemplate(source).render(messages)
    with pytest.raises(TooLong, match="more than 1000 characters"):
        ChatTemplate("{% for i in range(100000) %}x{% endfor %}").render(messages, max_chars=1000)
    out_of_memory = ChatTemplate("{{ grow() }}")

    def grow():
        raise MemoryError

    out_of_memory._template.globals["grow"] = grow
    with pytest.raises(TemplateError, match="MemoryError"):
        out_of_memory.render(messages)


def test_template_failures_are_the_servers_errors(run_dir):
    """Findings 8, 10: a template's own failure (here running past its time bound, dividing by
    zero, the sandbox) is a 500 server_error; only raise_exception is the request's 400. A
    runaway template does not hold the server."""
    template = ChatTemplate("{% if messages[0].content == 'loop' %}{% for i in range(100000) %}"
                            "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
                            "{{ 1 / (messages[0].content != 'zero') }}{{ messages[0].content.__class__ }}"
                            "{% if messages[0].content == 'no' %}{{ raise_exception('refused') }}{% endif %}")
    template.seconds = 0.5
    s = Server(run_dir, slots=1, queue=1, chat_template=template)
    try:
        for content, status in (("loop", 500), ("zero", 500), ("x", 200), ("no", 400)):
            r = post(s, {"messages": [{"role": "user", "content": content}], "max_tokens": 1})
            error = openai_error(r, status) if status != 200 else None
            assert r.status_code == status, (content, r.text)
            if error:
                assert error["type"] == ("server_error" if status == 500 else "invalid_request_error"), error
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.close()
