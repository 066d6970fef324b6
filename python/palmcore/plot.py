"""loss.png without a plotting library: the training loss (blue) and validation loss (orange)
against the step, drawn with NumPy and written as a PNG with zlib. Axes start at the first
step and span the losses' range; the numbers themselves are in metrics.jsonl."""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np

_BLUE, _ORANGE, _GREY = (31, 119, 180), (255, 127, 14), (120, 120, 120)


def write_loss_png(metrics_path: str, png_path: str, width: int = 720, height: int = 400) -> None:
    rows = []
    with open(metrics_path) as f:
        for line in f:
            rows.append(json.loads(line))
    train = np.array([(r["step"], r["loss"]) for r in rows if np.isfinite(r.get("loss", np.nan))])
    val = np.array([(r["step"], r["val_loss"]) for r in rows if "val_loss" in r])
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    margin = 30
    if len(train):
        points = np.concatenate([train, val]) if len(val) else train
        x0, x1 = points[:, 0].min(), max(points[:, 0].max(), points[:, 0].min() + 1)
        y0, y1 = points[:, 1].min(), max(points[:, 1].max(), points[:, 1].min() + 1e-9)

        def to_pixels(xy):
            px = margin + (xy[:, 0] - x0) / (x1 - x0) * (width - 2 * margin)
            py = height - margin - (xy[:, 1] - y0) / (y1 - y0) * (height - 2 * margin)
            return np.stack([px, py], axis=1)

        _polyline(canvas, to_pixels(train), _BLUE)
        if len(val):
            _polyline(canvas, to_pixels(val), _ORANGE, thick=2)
    _polyline(canvas, np.array([[margin, margin], [margin, height - margin],
                                [width - margin, height - margin]], float), _GREY)
    _write_png(png_path, canvas)


def _polyline(canvas: np.ndarray, points: np.ndarray, color, thick: int = 1) -> None:
    """Segments between consecutive points, sampled one pixel apart."""
    if len(points) == 1:
        points = np.repeat(points, 2, axis=0)
    for (ax, ay), (bx, by) in zip(points[:-1], points[1:]):
        n = int(max(abs(bx - ax), abs(by - ay))) + 1
        xs = np.rint(np.linspace(ax, bx, n)).astype(int)
        ys = np.rint(np.linspace(ay, by, n)).astype(int)
        for d in range(thick):
            canvas[np.clip(ys + d, 0, canvas.shape[0] - 1), np.clip(xs, 0, canvas.shape[1] - 1)] = color


def _write_png(path: str, rgb: np.ndarray) -> None:
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)
