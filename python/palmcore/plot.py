"""loss.png: the training and validation loss of a run against the step, drawn with matplotlib
(its object API and the Agg canvas: no display, no global state), from metrics.jsonl.

metrics.jsonl is append-only: a step can appear more than once (a replay after a rollback or a
resume), and the last line for a step is the truth. Lines without a step (events) and lines a
crash cut short are skipped.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

from palmcore.files import umask


def loss_curves(rows: list[dict]) -> tuple[list, list, float | None]:
    """(train [(step, loss)], validation [(step, val_loss)], the last val_bpb or None) from
    metrics lines, the last line for each step winning, non-finite values left out."""
    by_step: dict[int, dict] = {}
    for row in rows:
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = {**by_step.get(row["step"], {}), **row} if row.get("final") else row
    train, val, bpb = [], [], None
    for step in sorted(by_step):
        row = by_step[step]
        if _finite(row.get("loss")):
            train.append((step, row["loss"]))
        if _finite(row.get("val_loss")):
            val.append((step, row["val_loss"]))
            bpb = row["val_bpb"] if _finite(row.get("val_bpb")) else bpb
    return train, val, bpb


def title(run_name: str, final_bpb: float | None) -> str:
    return run_name if final_bpb is None else f"{run_name} — final val {final_bpb:.3f} bits/byte"


def read_metrics(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # a line cut short by a crash
    return rows


def write_loss_png(metrics_path: str, png_path: str, run_name: str | None = None) -> None:
    """Draw metrics.jsonl's curves into ``png_path`` (written atomically, following the umask);
    the title is the run's name (default: the folder holding metrics.jsonl) and the last
    validation bits per byte."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (import palmcore stays light)
    from matplotlib.figure import Figure  # noqa: PLC0415

    train, val, bpb = loss_curves(read_metrics(metrics_path))
    name = run_name or os.path.basename(os.path.dirname(os.path.abspath(metrics_path)))
    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), linewidth=1, label="train")
    if val:
        axes.plot(*zip(*val), marker="o", markersize=4, linewidth=1.5, label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats)")
    axes.set_title(title(name, bpb))
    axes.grid(True, alpha=0.3)
    if train or val:
        axes.legend()
    figure.tight_layout()
    directory = os.path.dirname(os.path.abspath(png_path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".png")
    try:
        os.chmod(tmp, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            figure.savefig(f, format="png")
        os.replace(tmp, png_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
