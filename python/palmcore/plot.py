"""loss.png: training and validation loss against the step, drawn with matplotlib.

The data come from a run's metrics.jsonl, which is append-only and may list a step more than once
(after a rollback the replayed steps are appended again, marked "replay": true). For each step the
last line wins; a line without "loss" (an evaluation-only line, such as the final evaluation when
a time budget stops a run between evaluations) adds its validation numbers to that step instead of
erasing the step's training loss. Non-finite values, lines without a step (events) and lines a
crash cut short are left out.

matplotlib is imported inside write_loss_png, so `import palmcore` stays light, and only through
its object API with the Agg canvas: no pyplot, no global figure state, no display needed.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from typing import Iterable, List, Optional, Tuple

Points = List[Tuple[int, float]]

FIGSIZE = (8.0, 4.5)  # inches
DPI = 100  # -> 800 x 450 pixels


def read_metrics(metrics_path: str) -> List[dict]:
    """The JSON objects of metrics.jsonl in file order; blank or unreadable lines (a line cut short
    by a crash mid-write) are skipped, and a missing file reads as no lines."""
    rows = []
    try:
        with open(metrics_path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except FileNotFoundError:
        pass
    return rows


def _finite(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def loss_curves(rows: Iterable[dict]) -> Tuple[Points, Points, Optional[float]]:
    """(train, val, final_bpb) from metrics rows in file order.

    train: (step, loss) and val: (step, val_loss), sorted by step, one point per step, finite values
    only. For each step the last line wins; a line without "loss" is merged into the step's earlier
    line rather than replacing it. final_bpb: val_bpb at the latest step that has a finite one, or
    None when there is no validation yet."""
    by_step = {}
    for row in rows:
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
            continue
        step = int(step)
        if "loss" in row or step not in by_step:
            by_step[step] = dict(row)
        else:
            by_step[step].update(row)
    train, val, final_bpb = [], [], None
    for step in sorted(by_step):
        row = by_step[step]
        loss, val_loss, bpb = _finite(row.get("loss")), _finite(row.get("val_loss")), _finite(row.get("val_bpb"))
        if loss is not None:
            train.append((step, loss))
        if val_loss is not None:
            val.append((step, val_loss))
        if bpb is not None:
            final_bpb = bpb
    return train, val, final_bpb


def plot_title(run_name: str, final_bpb: Optional[float]) -> str:
    """"<run name> — final val bits/byte 1.234", or just the run name before any validation."""
    if final_bpb is None:
        return run_name
    return f"{run_name} \N{EM DASH} final val bits/byte {final_bpb:.3f}"


def run_name(metrics_path: str) -> str:
    """The name of the folder holding metrics.jsonl."""
    return os.path.basename(os.path.dirname(os.path.abspath(metrics_path)))


def write_loss_png(metrics_path: str, png_path: str, title: Optional[str] = None) -> None:
    """Draw loss.png from metrics.jsonl (x: step, y: loss in nats; train and validation curves),
    titled "<title> — final val bits/byte X" where title defaults to the run folder's name.

    The PNG (FIGSIZE at DPI) is written to a temporary file in png_path's folder (created with the
    process's umask, like any other file) and moved into place with os.replace, so a reader never
    sees half a file. With no data yet it still draws the labelled, empty axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    train, val, final_bpb = loss_curves(read_metrics(metrics_path))
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, color="tab:blue", linewidth=1.0, label="train",
                marker="o" if len(train) == 1 else None, markersize=3)
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, color="tab:orange", linewidth=1.5, marker="o", markersize=4, label="validation")
    if train or val:
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no losses yet", transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.set_title(plot_title(run_name(metrics_path) if title is None else title, final_bpb))
    fig.tight_layout()

    folder = os.path.dirname(os.path.abspath(png_path))
    tmp = os.path.join(folder, f".{os.path.basename(png_path)}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        os.replace(tmp, png_path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
