"""palmcore serve: the OpenAI client against a server on loopback, over a tiny trained checkpoint."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

import palmcore  # noqa: E402
from palmcore.serve import make_app  # noqa: E402
from palmcore.training import run  # noqa: E402

from helpers import start_server, tiny_run_settings  # noqa: E402

SAMPLING = dict(temperature=0.9, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run(tiny_run_settings(corpus, out, steps=8, sample_tokens=0, seq_len=32), log=lambda _: None)
    return str(out)


@pytest.fixture(scope="module")
def reference(run_dir):
    """A model and tokenizer of their own: the server's model is its engine's alone."""
    return palmcore.load(run_dir)


class Server:
    def __init__(self, run_dir, slots, queue, **options):
        model, tokenizer = palmcore.load(run_dir)
        self.app = make_app(model, tokenizer, "tiny", slots, queue, **options)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics").text
        values = {}
        for line in text.splitlines():
            if line.startswith("#"):
                assert re.fullmatch(r"# (HELP|TYPE) palmcore_\w+ .+", line), line
                continue
            m = re.fullmatch(r'(palmcore_\w+(?:\{\w+="[^"]*"\})?) (\S+)', line)
            assert m, line
            values[m.group(1)] = float(m.group(2))
        return values

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.app.state.engine.close()


@pytest.fixture(scope="module")
def server(run_dir):
    s = Server(run_dir, slots=16, queue=64)
    yield s
    s.close()


def want(reference, prompt_ids, n=1, max_tokens=12, seed=0, **sampling):
    model, tokenizer = reference
    rows = model.generate([prompt_ids] * n, max_new_tokens=max_tokens, stop_tokens=(1,), seed=seed,
                          **{**SAMPLING, **sampling})
    return [tokenizer.decode([t for t in r if t != 1]) for r in rows], [len(r) for r in rows]


def test_completion_equals_generate(server, reference):
    _, tokenizer = reference
    ids = [1] + tokenizer.encode("def x(")
    texts, lengths = want(reference, ids, seed=7)
    got = server.client.completions.create(model="tiny", prompt="def x(", max_tokens=12, seed=7, temperature=0.9,
                                           top_p=0.9, extra_body={"top_k": 20})
    assert got.choices[0].text == texts[0]
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == lengths[0]
    streamed = server.client.completions.create(model="tiny", prompt="def x(", max_tokens=12, seed=7, stream=True,
                                                temperature=0.9, top_p=0.9, extra_body={"top_k": 20})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == texts[0]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # token ids, n > 1 (row i of generate), a repetition penalty, logprobs of the chosen tokens
    texts, lengths = want(reference, ids, n=3, seed=3, repetition_penalty=1.3)
    got = server.client.completions.create(model="tiny", prompt=ids, max_tokens=12, seed=3, n=3, logprobs=2,
                                           temperature=0.9, top_p=0.9,
                                           extra_body={"repetition_penalty": 1.3, "top_k": 20})
    assert [c.text for c in got.choices] == texts
    for c, n in zip(got.choices, lengths):
        assert len(c.logprobs.token_logprobs) == n and all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert all(1 <= len(top) <= 2 for top in c.logprobs.top_logprobs)  # pieces may decode alike


def test_32_concurrent_streams_get_their_own_tokens(server, reference):
    _, tokenizer = reference
    prompts = [f"x{i % 5} = (" for i in range(32)]
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

    async def one(i):
        stream = await client.completions.create(model="tiny", prompt=prompts[i], max_tokens=10, seed=i,
                                                 stream=True, extra_body={"top_k": 20}, temperature=0.9,
                                                 top_p=0.9)
        return "".join([c.choices[0].text async for c in stream])

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(32)))

    got = asyncio.run(all_of_them())
    for i, text in enumerate(got):
        assert text == want(reference, [1] + tokenizer.encode(prompts[i]), max_tokens=10, seed=i)[0][0], i


def test_disconnect_frees_the_slot(server):
    before = server.metrics()['palmcore_sequences_total{outcome="cancelled"}']
    body = {"model": "tiny", "prompt": "def", "max_tokens": 25, "stream": True, "seed": 1}
    engine = server.app.state.engine
    gate = Gate(engine)
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        gate.release_one()  # prefill: the first token comes out
        next(response.iter_lines())
        assert server.metrics()["palmcore_slots_busy"] == 1
    gate.open()
    deadline = time.monotonic() + 10
    while server.metrics()["palmcore_slots_busy"] != 0:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.01)
    assert server.metrics()['palmcore_sequences_total{outcome="cancelled"}'] == before + 1


class Gate:
    """Holds the engine's model calls until released: requests stay in their slots."""

    def __init__(self, engine):
        self.cache, self.allowed = engine.cache, threading.Semaphore(0)
        self.engine, self.opened = engine, False
        engine.cache = self

    def reset(self, slot):
        self.cache.reset(slot)

    def feed(self, tokens, slots):
        if not self.opened:
            self.allowed.acquire()
        return self.cache.feed(tokens, slots)

    def release_one(self):
        self.allowed.release()

    def open(self):
        self.opened = True
        self.engine.cache = self.cache
        self.allowed.release(100)


def wait_for(condition, what: str, seconds: float = 10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_prefill_fault_fails_only_its_request(server, reference):
    """One request's prefill trips the memory guard while another decodes: the healthy one
    completes as generate makes it, the faulty one gets its own error, the server serves on."""
    _, tokenizer = reference
    texts, _ = want(reference, [1] + tokenizer.encode("def"), max_tokens=12, seed=5)
    healthy = {"model": "tiny", "prompt": "def", "max_tokens": 12, "seed": 5, **SAMPLING}
    faulty = {"model": "tiny", "prompt": [5] * (reference[0].config.max_seq_len - 2), "max_tokens": 1}
    engine, errors = server.app.state.engine, server.metrics()['palmcore_sequences_total{outcome="error"}']
    gate, results = Gate(engine), {}
    threads = [threading.Thread(target=lambda: results.update(healthy=post(server, healthy))),
               threading.Thread(target=lambda: results.update(faulty=post(server, faulty)))]
    try:
        threads[0].start()
        wait_for(lambda: engine.busy_slots == 1, "the healthy request was not admitted")
        made = engine.metrics.generated_tokens
        gate.release_one()  # the healthy prefill, before the limit
        wait_for(lambda: engine.metrics.generated_tokens > made, "the healthy prefill did not run")
        palmcore.set_memory_limit(palmcore._core.allocated_bytes() + 48 * 1024)  # a decode step fits (~32 KiB), a prefill not (> 64 KiB)
        threads[1].start()
        wait_for(lambda: engine.busy_slots + engine.queue_length == 2, "the faulty request was not queued")
        gate.open()
        for t in threads:
            t.join(30)
    finally:
        gate.open()
        palmcore.set_memory_limit(None)
    assert results["healthy"].status_code == 200, results["healthy"].text
    assert results["healthy"].json()["choices"][0]["text"] == texts[0]
    assert results["faulty"].status_code == 500
    assert "out of memory" in results["faulty"].json()["error"]["message"]
    assert server.metrics()['palmcore_sequences_total{outcome="error"}'] == errors + 1
    assert engine.busy_slots == 0 and post(server, healthy).json()["choices"][0]["text"] == texts[0]


def test_a_stop_string_counts_as_stop(server, reference):
    _, tokenizer = reference
    texts, _ = want(reference, [1] + tokenizer.encode("def"), max_tokens=28, seed=4)
    assert texts[0], "the seed's text is empty: choose another"
    before = server.metrics()
    engine, results = server.app.state.engine, []
    gate = Gate(engine)
    body = {"model": "tiny", "prompt": "def", "max_tokens": 28, "seed": 4, "stop": texts[0][:1], **SAMPLING}
    thread = threading.Thread(target=lambda: results.append(post(server, body)))
    try:
        thread.start()
        while thread.is_alive():  # a step at a time: the stop string ends it long before max_tokens
            made = engine.metrics.generated_tokens
            gate.release_one()
            wait_for(lambda: engine.metrics.generated_tokens > made or not thread.is_alive(), "no step was made")
    finally:
        gate.open()
    assert results[0].json()["choices"][0]["finish_reason"] == "stop"
    wait_for(lambda: engine.busy_slots == 0, "the slot was not freed")
    after = server.metrics()
    for outcome, added in (("stop", 1), ("length", 0), ("cancelled", 0)):
        key = f'palmcore_sequences_total{{outcome="{outcome}"}}'
        assert after[key] == before[key] + added, outcome


def post(server, body, content=None):
    return httpx.post(server.url + "/v1/completions", json=None if content is not None else body,
                      content=content, headers={"content-type": "application/json"})


@pytest.mark.parametrize("case", ["malformed", "unknown", "temperature", "top_p", "too_long", "utf8", "n",
                                  "surrogate", "token_id"])
def test_bad_requests_get_400(server, reference, case):
    ok = {"model": "tiny", "prompt": "def", "max_tokens": 2}
    max_seq_len = reference[0].config.max_seq_len
    bodies = {"unknown": {**ok, "frobnicate": 1}, "temperature": {**ok, "temperature": -1},
              "top_p": {**ok, "top_p": 1.5}, "too_long": {**ok, "prompt": [5] * max_seq_len},
              "n": {**ok, "n": 0}, "token_id": {**ok, "prompt": [1, 10**6]}}
    contents = {"malformed": b'{"prompt": "x", ', "utf8": b'{"model": "tiny", "prompt": "\xff\xfe"}',
                "surrogate": b'{"model": "tiny", "prompt": "\\ud800"}'}
    r = post(server, bodies.get(case), contents.get(case))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert post(server, ok).status_code == 200  # still serving
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model="tiny", prompt="def", max_tokens=2, temperature=-1)


def test_429_when_slots_and_queue_are_full(run_dir):
    server = Server(run_dir, slots=1, queue=1)
    try:
        gate = Gate(server.app.state.engine)
        body = {"model": "tiny", "prompt": "def", "max_tokens": 3, "seed": 0}
        results = []
        first = threading.Thread(target=lambda: results.append(post(server, body)))
        second = threading.Thread(target=lambda: results.append(post(server, body)))
        first.start()
        second.start()
        deadline = time.monotonic() + 10
        while (m := server.metrics())["palmcore_slots_busy"] + m["palmcore_queue_length"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError):
            server.client.completions.create(model="tiny", prompt="def", max_tokens=3)
        gate.open()
        first.join(10)
        second.join(10)
        assert [r.status_code for r in results] == [200, 200]
        assert results[0].json()["choices"] == results[1].json()["choices"]
        assert server.metrics()['palmcore_sequences_total{outcome="rejected"}'] == 1
    finally:
        server.close()


def test_models_health_and_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in server.client.models.list()] == ["tiny"]
    m = server.metrics()
    for name in ("palmcore_queue_length", "palmcore_slots_busy", "palmcore_slots", "palmcore_tokens_per_second",
                 "palmcore_generated_tokens_total", "palmcore_time_to_first_token_seconds_count"):
        assert name in m
    assert m["palmcore_slots"] == 16
    assert json.loads(httpx.get(server.url + "/v1/models").text)["object"] == "list"


def test_sigterm_drains_and_exits(run_dir):
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    proc, port = start_server(run_dir, "--slots", "2", "--threads", "1")
    try:
        url = f"http://127.0.0.1:{port}"
        body = {"model": os.path.basename(run_dir), "prompt": "def", "max_tokens": 20, "stream": True, "seed": 2}
        with httpx.stream("POST", url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)  # the request in flight still completes
            assert [line for line in lines if line][-1] == "data: [DONE]"
        # uvicorn re-raises the signal after its graceful shutdown: the process ends by SIGTERM
        assert proc.wait(30) == -signal.SIGTERM, proc.stderr.read()
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
