"""palmcore serve's /v1/chat/completions (palmcore.chat's templates) and its API key."""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("jinja2")
openai = pytest.importorskip("openai")

from palmcore.chat import ChatTemplate, check_messages  # noqa: E402
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
