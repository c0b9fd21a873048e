"""Training curves from `progress.csv` files as a PNG, drawn with Pillow (no plotting library needed)."""

import csv

import numpy as np
from PIL import Image, ImageDraw

from .atomic import atomic_write

COLORS = ("navy", "firebrick", "darkgreen", "darkorange", "purple", "teal")


def read_column(progress_csv, key):
    """(steps, values) of one logged value; rows without it are skipped."""
    with open(progress_csv, newline="") as f:
        rows = [(float(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key) not in (None, "")]
    return np.array(rows, dtype=np.float64).reshape(-1, 2).T


def curves_png(runs, keys, path, title="", width=640, panel_height=200, pad=48):
    """One panel per logged value in `keys`, one line per run; `runs` maps a label to its progress.csv.
    Returns the number of lines drawn (a run without a value draws nothing in that panel)."""
    height = 24 + panel_height * len(keys)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 4), title, fill="black")
    legend_x = width - pad
    for label, color in reversed(list(zip(runs, COLORS))):
        legend_x -= 7 * len(label) + 16
        draw.text((legend_x, 4), label, fill=color)
    drawn = 0
    for row, key in enumerate(keys):
        top, bottom = 24 + row * panel_height + 16, 24 + (row + 1) * panel_height - 20
        series = [(read_column(csv_path, key), color) for (_, csv_path), color in zip(runs.items(), COLORS)]
        series = [(s, c) for s, c in series if s.shape[1] >= 2]
        draw.rectangle([pad, top, width - pad, bottom], outline="gray")
        draw.text((pad + 4, top + 2), key, fill="black")
        if not series:
            continue
        steps = np.concatenate([s[0] for s, _ in series])
        values = np.concatenate([s[1] for s, _ in series])
        lo, hi = float(values.min()), float(values.max())
        for (s, v), color in series:
            x = pad + (s - steps.min()) / max(np.ptp(steps), 1) * (width - 2 * pad)
            y = bottom - (v - lo) / max(hi - lo, 1e-12) * (bottom - top)
            draw.line(list(zip(x.tolist(), y.tolist())), fill=color, width=2)
            drawn += 1
        draw.text((4, top), f"{hi:.3g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.3g}", fill="black")
        draw.text((pad, bottom + 4), f"step {int(steps.min())}", fill="black")
        draw.text((width - pad - 70, bottom + 4), f"step {int(steps.max())}", fill="black")
    if drawn:
        atomic_write(path, img.save)
    return drawn
