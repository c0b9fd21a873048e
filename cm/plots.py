"""Training curves from `progress.csv` files as a PNG, drawn with Pillow (no plotting library needed)."""

import csv

import numpy as np
from PIL import Image, ImageDraw

from .atomic import atomic_write

COLORS = ("navy", "firebrick", "darkgreen", "darkorange", "purple", "teal", "olive", "magenta")


def read_column(progress_csv, key):
    """(steps, values) of one logged value; rows without it are skipped."""
    with open(progress_csv, newline="") as f:
        rows = [(float(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key) not in (None, "")]
    return np.array(rows, dtype=np.float64).reshape(-1, 2).T


def panels_png(panels, path, title="", x_label="step", log_x=False, width=640, panel_height=200, pad=48):
    """One panel per (name, {label: (x, y)}) in `panels`, one line per label, the same color for a label in
    every panel; x on a log scale with `log_x`. Returns the number of lines drawn (nothing is written if 0)."""
    labels = list(dict.fromkeys(label for _, lines in panels for label in lines))
    colors = dict(zip(labels, COLORS * (len(labels) // len(COLORS) + 1)))
    head = 40  # the title, then the legend on a line of its own
    img = Image.new("RGB", (width, head + panel_height * len(panels)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 4), title, fill="black")
    legend_x = width - pad
    for label in reversed(labels):
        legend_x -= 7 * len(label) + 16
        draw.text((legend_x, 20), label, fill=colors[label])
    drawn = 0
    for row, (name, lines) in enumerate(panels):
        top, bottom = head + row * panel_height + 16, head + (row + 1) * panel_height - 20
        draw.rectangle([pad, top, width - pad, bottom], outline="gray")
        draw.text((pad + 4, top + 2), name, fill="black")
        lines = {k: (np.asarray(x, float), np.asarray(y, float)) for k, (x, y) in lines.items() if len(x) >= 2}
        if not lines:
            continue
        xs = np.concatenate([x for x, _ in lines.values()])
        ys = np.concatenate([y for _, y in lines.values()])
        scale = np.log if log_x else (lambda v: v)
        x_lo, x_span = scale(xs.min()), max(np.ptp(scale(xs)), 1e-12)
        lo, hi = float(ys.min()), float(ys.max())
        for label, (x, y) in lines.items():
            px = pad + (scale(x) - x_lo) / x_span * (width - 2 * pad)
            py = bottom - (y - lo) / max(hi - lo, 1e-12) * (bottom - top)
            draw.line(list(zip(px.tolist(), py.tolist())), fill=colors[label], width=2)
            drawn += 1
        draw.text((4, top), f"{hi:.3g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.3g}", fill="black")
        draw.text((pad, bottom + 4), f"{x_label} {xs.min():g}", fill="black")
        right = f"{x_label} {xs.max():g}"
        draw.text((width - pad - 7 * len(right), bottom + 4), right, fill="black")
    if drawn:
        atomic_write(path, img.save)
    return drawn


def curves_png(runs, keys, path, title=""):
    """Logged values against steps: one panel per key in `keys`, one line per run ({label: progress.csv})."""
    columns = {label: {key: read_column(csv_path, key) for key in keys} for label, csv_path in runs.items()}
    panels = [(key, {label: tuple(columns[label][key]) for label in runs if columns[label][key].shape[1]}) for key in keys]
    return panels_png(panels, path, title=title)
