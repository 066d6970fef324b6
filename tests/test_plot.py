"""loss.png: the data selection (last line per step, finite values, final bits/byte), the title,
and the PNG file itself (valid, of the expected size, written atomically)."""

import json
import math
import os
import struct

import pytest

from palmcore.plot import DPI, FIGSIZE, loss_curves, plot_title, read_metrics, run_name, write_loss_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path, rows, tail=""):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write(tail)


def png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return width, height


EXPECTED_SIZE = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))

ROWS = [
    {"step": 1, "loss": 5.0, "ce": 5.0},
    {"step": 2, "loss": 4.0, "ce": 4.0, "val_loss": 4.5, "val_ppl": 90.0, "val_bpb": 2.5},
    {"step": 3, "loss": 9.0, "ce": 9.0},  # diverged: rolled back to step 2, steps 3-4 replayed
    {"step": 4, "loss": float("nan"), "ce": float("nan"), "val_loss": 9.5, "val_bpb": 7.0},
    {"step": 3, "loss": 3.5, "ce": 3.5, "replay": True},
    {"step": 4, "loss": 3.0, "ce": 3.0, "val_loss": 3.2, "val_bpb": 1.8, "replay": True},
    {"step": 5, "loss": 2.8, "ce": 2.8},
    {"step": 5, "val_loss": 3.1, "val_ppl": 22.0, "val_bpb": 1.75, "final": True},  # evaluation only
]


def test_loss_curves_last_line_per_step_wins():
    train, val, bpb = loss_curves(ROWS)
    assert train == [(1, 5.0), (2, 4.0), (3, 3.5), (4, 3.0), (5, 2.8)]
    assert val == [(2, 4.5), (4, 3.2), (5, 3.1)]
    assert bpb == 1.75


def test_loss_curves_replay_erases_stale_validation():
    rows = [{"step": 2, "loss": 4.0, "val_loss": 9.0, "val_bpb": 5.0},
            {"step": 2, "loss": 3.9, "replay": True}]  # the replayed line carries no evaluation
    assert loss_curves(rows) == ([(2, 3.9)], [], None)


def test_loss_curves_skips_non_finite_and_non_numbers():
    rows = [{"step": 1, "loss": float("inf"), "val_loss": float("nan"), "val_bpb": float("nan")},
            {"step": 2, "loss": None, "val_loss": "x"},
            {"step": 3, "loss": 1.5, "val_loss": -float("inf"), "val_bpb": 0.9},
            {"loss": 1.0},  # no step
            {"step": 4, "loss": True}]
    train, val, bpb = loss_curves(rows)
    assert train == [(3, 1.5)]
    assert val == []
    assert bpb == 0.9


def test_loss_curves_sorted_by_step_and_final_bpb_is_latest_step():
    rows = [{"step": 10, "loss": 2.0, "val_loss": 2.1, "val_bpb": 1.1},
            {"step": 5, "loss": 3.0, "val_loss": 3.1, "val_bpb": 1.6}]
    train, val, bpb = loss_curves(rows)
    assert train == [(5, 3.0), (10, 2.0)]
    assert val == [(5, 3.1), (10, 2.1)]
    assert bpb == 1.1


def test_loss_curves_empty_and_only_validation():
    assert loss_curves([]) == ([], [], None)
    assert loss_curves([{"step": 7, "val_loss": 2.0, "val_bpb": 1.25}]) == ([], [(7, 2.0)], 1.25)


def test_plot_title():
    assert plot_title("run-a", 1.23456) == "run-a \u2014 final val bits/byte 1.235"
    assert plot_title("run-a", None) == "run-a"
    assert run_name(os.path.join("runs", "tiny", "metrics.jsonl")) == "tiny"


def test_read_metrics_skips_blank_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_jsonl(path, ROWS[:2], tail='\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2]
    assert read_metrics(str(tmp_path / "missing.jsonl")) == []


def test_read_metrics_round_trips_nan(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_jsonl(path, [{"step": 1, "loss": float("nan")}])
    assert math.isnan(read_metrics(str(path))[0]["loss"])


@pytest.mark.parametrize("rows", [
    ROWS,
    [],
    [{"step": 5, "val_loss": 3.0, "val_ppl": 20.0, "val_bpb": 1.7, "final": True}],
    [{"step": 1, "loss": 5.0}],
    [{"step": 1, "loss": float("nan")}],
], ids=["full", "empty", "only-val", "single-point", "only-nan"])
def test_write_loss_png(tmp_path, rows):
    run = tmp_path / "my-run"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    write_jsonl(metrics, rows)
    png = run / "loss.png"
    write_loss_png(str(metrics), str(png))
    assert png_size(png) == EXPECTED_SIZE
    assert sorted(os.listdir(run)) == ["loss.png", "metrics.jsonl"]  # no temporary file left behind


def test_write_loss_png_replaces_existing_file_and_takes_a_title(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_jsonl(metrics, ROWS)
    png = tmp_path / "out" / "loss.png"
    png.parent.mkdir()
    png.write_bytes(b"old")
    write_loss_png(str(metrics), str(png), title="custom")
    assert png_size(png) == EXPECTED_SIZE
    assert os.listdir(png.parent) == ["loss.png"]


def test_import_palmcore_does_not_import_matplotlib():
    import subprocess
    import sys
    code = "import sys, palmcore, palmcore.plot; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_write_loss_png_follows_the_umask(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_jsonl(metrics, ROWS)
    old = os.umask(0o027)
    try:
        write_loss_png(str(metrics), str(tmp_path / "loss.png"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "loss.png").st_mode & 0o777 == 0o640
