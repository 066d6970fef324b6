"""Hostile files at every reader (issue 20, items 14-16): a malformed safetensors header, a file
that is not a regular file or is far too large, a config.json whose fields are of the wrong
kind. Each gives a ValueError naming the file and the field (exit status 2 and a message at the
command line), before anything is built from it; nothing hangs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import palmcore
from palmcore import checkpoint
from palmcore.cli import main as cli
from palmcore.interchange import export_hf, import_hf


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A palmcore run (with a tokenizer), its Hugging Face export and a sharded export."""
    root = tmp_path_factory.mktemp("sources")
    tok = palmcore.Tokenizer.train(["def f(x):\n    return x + 1\n" * 50, "hello world " * 40], 300,
                                   str(root / "tok.model"))
    cfg = palmcore.PaLMConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                              ffn_dim=32, max_seq_len=32)
    model = palmcore.PaLM(cfg, seed=0)
    checkpoint.save(str(root / "run" / "checkpoints"), model, step=1, tokenizer_path=tok.model_path)
    export_hf(model, tok, str(root / "hf"))
    export_hf(model, None, str(root / "sharded"), max_shard_bytes=2_000)
    return root


@pytest.fixture()
def copies(sources, tmp_path):
    for name in ("run", "hf", "sharded"):
        shutil.copytree(sources / name, tmp_path / name, symlinks=True)
    return tmp_path


def step_dir(root: Path) -> Path:
    return root / "run" / "checkpoints" / "step-00000001"


def fullest_shard(root: Path) -> Path:
    files = json.loads((root / "sharded" / "model.safetensors.index.json").read_text())["weight_map"].values()
    return root / "sharded" / max(sorted(set(files)), key=list(files).count)


# each reader: (the weights file it reads in the copies, what reads it)
READERS = {
    "import_hf": (lambda root: root / "hf" / "model.safetensors", lambda root: import_hf(str(root / "hf"))),
    "import_hf sharded": (fullest_shard, lambda root: import_hf(str(root / "sharded"))),
    "palmcore import": (lambda root: root / "hf" / "model.safetensors",
                        lambda root: cli(["import", "--from", str(root / "hf"), "--out", str(root / "imported")])),
    "checkpoint.load": (lambda root: step_dir(root) / "model.safetensors",
                        lambda root: checkpoint.load(str(step_dir(root)))),
    "palmcore.load": (lambda root: step_dir(root) / "model.safetensors",
                      lambda root: palmcore.load(str(root / "run"))),
}


def refused(read, root, capsys, match: str) -> None:
    """``read(root)`` raises a ValueError matching ``match`` (at the command line: exit status 2
    and the message, no traceback)."""
    try:
        read(root)
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 2 and "Traceback" not in err, err
        assert re.match(r"palmcore (import|export): error: ", err), err
        message = err
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError("the hostile file was accepted")
    assert re.search(match, message), message


# ----------------------------------------------------------------------------- safetensors headers


def _by_offset(header: dict) -> list[str]:
    return sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])


def _set(index: int, **fields):
    def change(header):
        header[_by_offset(header)[index]].update(fields)
        return header
    return change


def _offsets(index: int, make):
    def change(header):
        entry = header[_by_offset(header)[index]]
        entry["data_offsets"] = make(*entry["data_offsets"])
        return header
    return change


def _overlap(header):
    first, second = _by_offset(header)[:2]
    header[second] = dict(header[first])
    return header


def _beyond(header):
    last = header[_by_offset(header)[-1]]
    last["shape"] = [math.prod(last["shape"]) + 2]
    last["data_offsets"][1] += 8
    return header


def _metadata(value):
    def change(header):
        header["__metadata__"] = value
        return header
    return change


# (change of the header's JSON object, or the raw header bytes; what the message must name)
HEADERS = {
    "offsets empty": (_offsets(0, lambda b, e: []), r"data_offsets must be \[begin, end\].* got \[\]"),
    "offsets not a list": (_offsets(0, lambda b, e: "ab"), r"data_offsets must be .* got 'ab'"),
    "offsets strings": (_offsets(0, lambda b, e: [str(b), str(e)]), r"data_offsets must be .* got \['0', "),
    "offsets negative": (_offsets(0, lambda b, e: [b - 4, e - 4]), r"data_offsets must be .* got \[-4, "),
    "offsets reversed": (_offsets(0, lambda b, e: [e, b]), r"data_offsets must be .*0 <= begin <= end"),
    "offsets floats": (_offsets(0, lambda b, e: [float(b), float(e)]), r"data_offsets must be .* got \[0.0, "),
    "offsets overlap": (_overlap, r"data_offsets \[0, \d+\], but the tensors before it end at byte \d+"),
    "offsets beyond the file": (_beyond, r"truncated \(tensor '.*' ends at byte \d+ of \d+ data bytes\)"),
    "shape negative": (_set(0, shape=[-1, 16]), r"shape must be a list of non-negative integers, got \[-1, 16\]"),
    "shape float": (_set(0, shape=[2.5, 16]), r"shape must be a list of non-negative integers, got \[2.5, 16\]"),
    "shape bool": (_set(0, shape=[True]), r"shape must be a list of non-negative integers, got \[True\]"),
    "shape not a list": (_set(0, shape=16), r"shape must be a list of non-negative integers, got 16"),
    "shape disagrees": (_set(0, shape=[3, 3]), r"data_offsets \[0, \d+\] hold \d+ bytes, but shape \[3, 3\] of F32 "
                                               r"needs 36"),
    "dtype unknown": (_set(0, dtype="F7"), r"unknown dtype 'F7'"),
    "dtype not a string": (_set(0, dtype=4), r"unknown dtype 4"),
    "entry not an object": (lambda h: {**h, "x": 5}, r"tensor 'x': a header entry must be an object, got 5"),
    "entry without dtype": (lambda h: {**h, "x": {"shape": [0], "data_offsets": [0, 0]}},
                            r"tensor 'x': the header entry has no dtype"),
    "metadata not strings": (_metadata({"format": 1}), r"__metadata__ must map strings to strings"),
    "metadata a list": (_metadata(["pt"]), r"__metadata__ must map strings to strings"),
    "not an object": (b"[1, 2]", r"corrupt header \(not a JSON object but list\)"),
    "not JSON": (b"{not json", r"corrupt header \(not UTF-8 JSON: JSONDecodeError\)"),
    "not UTF-8": (b'{"\xff\xfe": 1}', r"corrupt header \(not UTF-8 JSON: UnicodeDecodeError\)"),
    "UTF-16": ('{"a": 1}'.encode("utf-16"), r"corrupt header \(not UTF-8 JSON"),
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, r"corrupt header \(not UTF-8 JSON: RecursionError\)"),
}


def write_header(path: Path, change) -> None:
    """Replace the header of the safetensors file ``path``, keeping its data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    encoded = change if isinstance(change, bytes) else json.dumps(change(json.loads(raw[8:8 + n]))).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + n:])


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("hostile", list(HEADERS))
def test_a_hostile_header_is_named_at_every_reader(copies, capsys, reader, hostile):
    target, read = READERS[reader]
    change, match = HEADERS[hostile]
    path = target(copies)
    write_header(path, change)
    refused(read, copies, capsys, re.escape(str(path)) + r": .*" + match)


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("length, match", [
    (2**63, r"truncated or corrupt \(header of 9223372036854775808 bytes in a \d+-byte file\)"),
    (200_000_000, r"corrupt header \(header of 200000000 bytes, beyond safetensors' limit of 100000000"),
])
def test_a_header_length_beyond_the_file_or_absurd_is_named(copies, capsys, reader, length, match):
    target, read = READERS[reader]
    path = target(copies)
    with open(path, "r+b") as f:
        f.write(length.to_bytes(8, "little"))
        f.truncate(max(os.path.getsize(path), 200_000_100))  # sparse: no disk, nothing read
    refused(read, copies, capsys, re.escape(str(path)) + r": " + match)


@pytest.mark.parametrize("weight_map, match", [
    (None, r"weight_map must be an object of tensor names to file names, got None"),
    ([1, 2], r"weight_map must be an object .* got \[1, 2\]"),
    ({"model.norm.weight": 5}, r"weight_map\['model.norm.weight'\] must be a file name beside the index, got 5"),
    ({"model.norm.weight": "../run/x.safetensors"}, r"weight_map\['model.norm.weight'\] .* got '../run/x.safetensors'"),
    ({"model.norm.weight": ".."}, r"weight_map\['model.norm.weight'\] must be a file name .* got '..'"),
    ({"model.norm.weight": ""}, r"weight_map\['model.norm.weight'\] must be a file name .* got ''"),
    ({"model.norm.weight": ["a"]}, r"weight_map\['model.norm.weight'\] must be a file name .* got \['a'\]"),
])
def test_a_bad_weight_map_is_named(copies, weight_map, match):
    index = copies / "sharded" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, **({} if weight_map is None else {"weight_map": weight_map})}))
    with pytest.raises(ValueError, match=re.escape(str(index)) + r" is damaged: " + match):
        import_hf(str(copies / "sharded"))


# ----------------------------------------------------------------------------- not regular files


# each reader of a directory's files: (the directory, what reads it)
DIRECTORIES = {
    "import_hf": (lambda root: root / "hf", lambda root: import_hf(str(root / "hf"))),
    "palmcore import": (lambda root: root / "hf",
                        lambda root: cli(["import", "--from", str(root / "hf"), "--out", str(root / "imported")])),
    "checkpoint.load": (step_dir, lambda root: checkpoint.load(str(step_dir(root)))),
    "palmcore.load": (step_dir, lambda root: palmcore.load(str(root / "run"))),
    "export": (step_dir, lambda root: cli(["export", "--checkpoint", str(step_dir(root)), "--out",
                                           str(root / "exported")])),
}


def _symlink_to_dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _one_gib(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(2**30)  # sparse


NOT_REGULAR = [
    ("config.json", _symlink_to_dev_zero, r"config.json is a character device, not a regular file"),
    ("config.json", _directory, r"config.json is a directory, not a regular file"),
    ("config.json", _one_gib, r"config.json is too large \(1073741824 bytes; at most \d+ expected\)"),
    ("model.safetensors", _symlink_to_dev_zero, r"model.safetensors is a character device, not a regular file"),
    ("model.safetensors", _directory, r"model.safetensors is a directory, not a regular file"),
    ("tokenizer.model", _one_gib, r"tokenizer.model is too large \(1073741824 bytes"),
]


@pytest.mark.parametrize("reader, name, make, match", [
    (reader, *case) for reader in DIRECTORIES for case in NOT_REGULAR
    if not (reader == "checkpoint.load" and case[0] == "tokenizer.model")])  # (which it does not read)
def test_what_is_not_a_regular_file_or_is_too_large_is_refused(copies, capsys, reader, name, make, match):
    folder, read = DIRECTORIES[reader]
    make(folder(copies) / name)
    if reader in ("palmcore.load", "export") and make is not _one_gib:
        match = r"no palmcore checkpoint in"  # these find checkpoints whose files are all regular files
    refused(read, copies, capsys, match)


@pytest.mark.parametrize("reader", list(DIRECTORIES))
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "complete.json"])
def test_a_fifo_is_refused_without_waiting_for_a_writer(copies, capsys, reader, name):
    folder, read = DIRECTORIES[reader]
    if name == "complete.json" and reader.startswith(("import", "palmcore import")):
        name = "model.safetensors.index.json"  # what an HF directory has that a reader may open first
    path = folder(copies) / name
    if path.exists():
        path.unlink()
    os.mkfifo(path)
    outcome = {}

    def attempt():
        try:
            read(copies)
        except BaseException as e:  # noqa: BLE001  (checked below, in the test's thread)
            outcome["error"] = e

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=20)  # a guard against a hang only: refusing takes milliseconds
    if thread.is_alive():  # blocked opening the FIFO: let it go before failing
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=60)
        raise AssertionError(f"{reader} waited on the FIFO {name}")
    err = capsys.readouterr().err
    error = outcome.get("error")
    if reader == "checkpoint.load" and name == "complete.json":
        assert error is None  # a checkpoint named directly is read without its marker
        return
    message = err if isinstance(error, SystemExit) and error.code == 2 else str(error) if isinstance(
        error, ValueError) else pytest.fail(f"{reader}: {error!r}")
    assert re.search(rf"{name} is a FIFO, not a regular file|no palmcore checkpoint in", message), message


# ----------------------------------------------------------------------------- config.json fields


@pytest.mark.parametrize("field, value", [
    ("hidden_size", 64.7), ("hidden_size", True), ("hidden_size", "16"), ("hidden_size", -16), ("hidden_size", 0),
    ("hidden_size", math.nan), ("num_attention_heads", 2.0), ("num_hidden_layers", None), ("vocab_size", [300]),
    ("intermediate_size", math.inf), ("num_key_value_heads", False), ("head_dim", "8"),
    ("max_position_embeddings", 1e9), ("layer_norm_eps", "1e-5"), ("layer_norm_eps", -1.0),
    ("rope_theta", True), ("rope_theta", math.nan), ("logit_scale", "0.25"),
])
def test_an_imported_config_field_of_the_wrong_kind_is_named(copies, capsys, field, value):
    path = copies / "hf" / "config.json"
    config = json.loads(path.read_text())
    config.pop("rope_parameters")  # (where rope_theta is read first)
    path.write_text(json.dumps({**config, field: value}))
    if value is None:
        match = rf"the field {field} is missing"
    else:
        why = "integer" if field not in ("layer_norm_eps", "rope_theta", "logit_scale") else "number"
        match = rf"palmcore cannot represent {field}={re.escape(repr(value))} \(a positive {why} is needed\)"
    for read in (DIRECTORIES["import_hf"][1], DIRECTORIES["palmcore import"][1]):
        refused(read, copies, capsys, re.escape(str(path)) + r": " + match)


@pytest.mark.parametrize("content, match", [
    ([1, 2], r"config.json is damaged: a JSON object was expected, got list"),
    ({"d_model": 16}, r"config.json is damaged: it has no vocab_size, n_layers, n_heads"),
    ("d_model=64.7", r"config.json is damaged: d_model must be an integer, got 64.7"),
    ("n_heads=null", r"config.json is damaged: n_heads must be an integer, got None"),
    ("norm_eps=\"x\"", r"config.json is damaged: norm_eps must be a number, got 'x'"),
    ("colour=1", r"config.json is damaged: unknown config fields: colour"),
])
def test_a_checkpoint_config_of_the_wrong_shape_is_named(copies, content, match):
    path = step_dir(copies) / "config.json"
    if isinstance(content, str):
        key, value = content.split("=")
        content = {**json.loads(path.read_text()), key: json.loads(value)}
    path.write_text(json.dumps(content))
    for read in (lambda: checkpoint.load(str(step_dir(copies))), lambda: palmcore.load(str(copies / "run"))):
        with pytest.raises(ValueError, match=match):
            read()


def test_symlinked_files_of_an_hf_cache_still_read(copies):
    """The Hugging Face cache links each file of a snapshot to a blob: links to regular files are followed."""
    blobs = copies / "blobs"
    blobs.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        os.rename(copies / "hf" / name, blobs / name)
        (copies / "hf" / name).symlink_to(blobs / name)
    model, tok = import_hf(str(copies / "hf"))
    assert tok is not None and np.isfinite(model.state_dict()["embed"]).all()
