"""The Python face (issue 16): palmcore.train, palmcore.generate and palmcore.pipeline, each
form of their arguments, their errors, and equality with the CLI for the same settings."""

from __future__ import annotations

import json
import os

import pytest

import palmcore
from palmcore import checkpoint
from palmcore.cli import main

TINY = dict(vocab_size=300, d_model=32, n_layers=1, n_heads=2, batch_size=4, seq_len=64, eval_every=2,
            progress=False, sample_tokens=0)
DOCS = [f"def function_{i}(x):\n    return x * {i} + {i * i}\n" * 3 for i in range(40)]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return palmcore.train(texts=DOCS, out=str(tmp_path_factory.mktemp("face") / "run"), steps=4, **TINY)


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [line["loss"] for line in map(json.loads, f) if "loss" in line]


def test_train_returns_the_run_its_metrics_model_and_tokenizer(result):
    assert isinstance(result, palmcore.TrainResult)
    assert result.metrics["steps"] == 4 and result.metrics["stopped_by"] == "steps" and "val_bpb" in result.metrics
    assert result.model.config.d_model == 32 and result.tokenizer.vocab_size == 300
    assert os.path.isdir(os.path.join(result.run, "checkpoints")) and len(os.listdir(os.path.join(result.run, "texts"))) == 40
    assert len(losses(result.run)) == 4


def test_train_equals_the_cli_for_the_same_settings(corpus, tmp_path):
    api = palmcore.train(corpus, out=str(tmp_path / "api"), steps=3, **TINY)
    assert main(["train", "--corpus", corpus, "--out", str(tmp_path / "cli"), "--steps", "3", "--vocab-size", "300",
                 "--set", "d_model=32", "--set", "n_layers=1", "--set", "n_heads=2", "--batch-size", "4",
                 "--seq-len", "64", "--eval-every", "2"]) == 0
    assert losses(api.run) == losses(str(tmp_path / "cli"))
    glob = palmcore.train(os.path.join(corpus, "*.py"), out=str(tmp_path / "glob"), steps=3, **TINY)
    assert losses(glob.run) == losses(api.run)  # the corpus folder holds only these files


def test_a_callback_sees_every_step_and_can_stop_the_run(tmp_path):
    seen = []

    def callback(step, metrics):
        seen.append((step, metrics["loss"]))
        return step < 2

    run = palmcore.train(texts=DOCS, out=str(tmp_path / "run"), steps=10, callback=callback, **TINY)
    assert [s for s, _ in seen] == [1, 2] and run.metrics["stopped_by"] == "callback" and run.metrics["steps"] == 2
    resumed = palmcore.train(texts=DOCS, out=str(tmp_path / "run"), steps=3, resume=True, **TINY)
    assert resumed.metrics["steps"] == 3


def test_a_callback_that_raises_keeps_its_steps(tmp_path):
    """The steps since the last checkpoint used to be lost (Ctrl-C saved them; an exception
    did not): the run saves a checkpoint, then the exception goes on."""
    def callback(step, metrics):
        if step == 3:
            raise RuntimeError("the notebook's plotting failed")

    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="the notebook's plotting failed"):
        palmcore.train(texts=DOCS, out=out, steps=10, callback=callback, **{**TINY, "eval_every": 100})
    assert checkpoint.latest(os.path.join(out, "checkpoints")).endswith("step-00000003")
    assert os.path.exists(os.path.join(out, "loss.png"))


@pytest.mark.parametrize("callback,match", [
    (42, r"callback must be a function called as callback\(step, metrics\), got 42"),
    (lambda step: None, r"callback must accept \(step, metrics\), but <lambda>\(step\) does not"),
    (lambda: None, r"callback must accept \(step, metrics\)"),
])
def test_a_callback_that_cannot_be_called_so_is_refused_before_anything_is_trained(tmp_path, callback, match):
    with pytest.raises(TypeError, match=match):
        palmcore.train(texts=DOCS, out=str(tmp_path / "run"), steps=2, callback=callback, **TINY)
    assert not os.path.exists(tmp_path / "run")


def test_a_two_string_corpus_trains_and_its_model_generates(tmp_path):
    """The README's example: two strings got a 10,000-token tokenizer and "the train split has 0
    tokens"; then a window of 1 token that was also the model's max_seq_len, so nothing could be generated."""
    tiny = dict(d_model=32, n_layers=1, n_heads=2, batch_size=2, progress=False, sample_tokens=0)
    result = palmcore.train(texts=["first document", "second"], out=str(tmp_path / "run"), steps=2, **tiny)
    assert result.tokenizer.vocab_size < 10000
    text = palmcore.generate(result, "Once upon a time", max_new_tokens=40, temperature=0.8, seed=0)
    assert isinstance(text, str)


def test_texts_are_written_under_the_lock_into_a_fresh_folder(tmp_path):
    """texts used to be written before the run lock (overwriting a running run's corpus) and
    into a folder that kept an earlier call's files (trained on, with that call's tokenizer)."""
    from palmcore.runlock import RunFolderInUse, RunLock

    out = tmp_path / "run"
    palmcore.train(texts=DOCS, out=str(out), steps=2, **TINY)
    corpus_before = sorted((p.name, p.read_text()) for p in (out / "texts").iterdir())
    with RunLock(str(out)):
        with pytest.raises(RunFolderInUse):
            palmcore.train(texts=["another corpus"], out=str(out), steps=2, resume=True, **TINY)
    assert sorted((p.name, p.read_text()) for p in (out / "texts").iterdir()) == corpus_before
    tokenizer_before = (out / "tokenizer.model").read_bytes()
    other = [f"SELECT column_{i} FROM table_{i} WHERE id = {i};\n" * 3 for i in range(5)]
    replaced = palmcore.train(texts=other, out=str(out), steps=2, force=True, **TINY)
    assert sorted((p.name, p.read_text()) for p in (out / "texts").iterdir()) == [
        (f"text-{i:06d}.txt", text) for i, text in enumerate(other)]
    assert (out / "tokenizer.model").read_bytes() != tokenizer_before          # trained on the new texts
    assert replaced.metrics["steps"] == 2 and len(losses(str(out))) == 2      # a new metrics.jsonl


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(texts="one document"), TypeError, "texts must be a list of strings .*, got a str"),
    (dict(texts={"a": 1}), TypeError, "texts must be a list of strings .*, got a dict"),
    (dict(texts=["x"], callback=print, resume=True, force=True), ValueError, "give one of them"),
    (dict(texts=[]), ValueError, "texts is empty"),
    (dict(texts=["ok", 3]), TypeError, r"texts\[1\] is a int"),
    (dict(texts=["x"], corpus="somewhere"), ValueError, "give corpus or texts, not both"),
    (dict(texts=["x"], dropout=0.1), TypeError, r"unknown training setting\(s\): dropout"),
    (dict(texts=["x"], batch_size=0), ValueError, "batch_size"),
])
def test_bad_training_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        palmcore.train(out=str(tmp_path / "run"), **{**dict(steps=1, progress=False), **kwargs})


def test_generate_takes_a_run_a_result_or_a_pair(result):
    kw = dict(max_new_tokens=8, temperature=0.9, seed=3)
    text = palmcore.generate(result.run, "def f", **kw)
    assert palmcore.generate(result, "def f", **kw) == text
    assert palmcore.generate((result.model, result.tokenizer), "def f", **kw) == text
    assert palmcore.generate(result, ["def f", "return"], **kw)[0] == text
    assert "".join(palmcore.generate(result, "def f", stream=True, **kw)) == text


def test_stop_strings_and_tokens(result):
    full = palmcore.generate(result, "def f", max_new_tokens=30, temperature=0)
    cut_at = full[3:5]  # a string the greedy continuation holds (after its first characters)
    want = full[:full.find(cut_at)]
    assert palmcore.generate(result, "def f", max_new_tokens=30, temperature=0, stop=cut_at) == want
    assert "".join(palmcore.generate(result, "def f", max_new_tokens=30, temperature=0, stop=[cut_at, "\0"],
                                     stream=True)) == want
    first = result.tokenizer.encode(full)[0]
    assert palmcore.generate(result, "def f", max_new_tokens=30, temperature=0, stop=first) == ""


@pytest.mark.parametrize("model,prompt,kwargs,error,match", [
    (42, "x", {}, TypeError, "model must be a run folder"),
    ("result", 7, {}, TypeError, "prompt must be a string or a list of strings"),
    ("result", ["a", "b"], dict(stream=True), TypeError, "stream=True takes one prompt"),
    ("result", "x", dict(stop=[""]), TypeError, "stop must be a non-empty string"),
    ("result", "x", dict(stop=1.5), TypeError, r"stop must be a non-empty string, a token id, or a list of them, "
                                               r"got 1.5"),
    ("result", "x", dict(stop={"a": 1}), TypeError, r"stop must be .*, got \{'a': 1\}"),
    ("result", "x", dict(top_p=0.0), ValueError, "top_p must be in"),
])
def test_bad_generation_arguments(result, model, prompt, kwargs, error, match):
    with pytest.raises(error, match=match):
        palmcore.generate(result if model == "result" else model, prompt, **kwargs)


def test_the_seed_articles_pipeline_lines_run(result):
    generator = palmcore.pipeline("text-generation", model=result.run)
    out = generator("The quick brown fox", max_length=50)
    assert isinstance(out, list) and len(out) == 1 and out[0]["generated_text"].startswith("The quick brown fox")
    # transformers' meaning: max_length counts the prompt's tokens; sampling with its defaults
    prompt_tokens = len(result.tokenizer.encode("The quick brown fox"))
    want = palmcore.generate(result, "The quick brown fox", max_new_tokens=50 - prompt_tokens, temperature=1.0,
                             top_k=50, top_p=1.0, seed=0)
    assert out == [{"generated_text": "The quick brown fox" + want}]


def test_pipeline_arguments(result):
    generator = palmcore.pipeline("text-generation", model=result)
    greedy = generator("def f", max_new_tokens=6, do_sample=False, return_full_text=False)
    assert greedy == [{"generated_text": palmcore.generate(result, "def f", max_new_tokens=6, temperature=0)}]
    three = generator("def f", max_new_tokens=6, num_return_sequences=3, seed=1)
    assert len(three) == 3 and len({d["generated_text"] for d in three}) > 1
    both = generator(["def f", "return"], max_new_tokens=4)
    assert len(both) == 2 and all(len(b) == 1 for b in both)
    with pytest.raises(ValueError, match="unknown task 'summarization'"):
        palmcore.pipeline("summarization", model=result)
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_beams'"):
        generator("x", num_beams=4)
    with pytest.raises(ValueError, match="needs do_sample=True"):
        generator("x", do_sample=False, num_return_sequences=2)
    with pytest.raises(ValueError, match=r"max_length \(1\) is shorter than the prompt"):
        generator("def f(x): return x", max_length=1)
