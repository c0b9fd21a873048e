"""Training curves from `progress.csv` files as a PNG, drawn with Pillow (no plotting library needed)."""

import re

import numpy as np
from PIL import Image, ImageDraw

from .atomic import atomic_write
from .logger import read_progress

COLORS = ("navy", "firebrick", "darkgreen", "darkorange", "purple", "teal", "olive", "magenta")


# the columns of the evaluations during training (evaluations/during_training.py): METRIC_NSTEP_LABEL, made by
# eval_column and read back by EVAL_COLUMN; LABEL is ema_label(rate) of a sampling EMA, or "model"
EVAL_COLUMN = re.compile(r"^(?P<metric>\w+?)_(?P<steps>\d+)step_(?P<network>ema[0-9.e-]+|model)$")
DEFAULT_KEYS = ("loss", "grad_norm", "lr")  # what plot_runs draws, then every evaluation column
DISTANCE_METRICS = ("fid", "sfid", "fd_dinov2")  # lower is better; drawn on a log scale: they fall by orders of magnitude


def ema_label(rate):
    """The evaluations' name of the sampling EMA of `rate` (a number or its text): ema0.9999, as the loop's files
    ema_0.9999_NNNNNN.pt name it (the float's text)."""
    return f"ema{float(rate)}"


def eval_column(metric, steps, label):
    """The progress.csv column of `metric` of `steps`-step samples of the network `label`: fid_1step_ema0.9999."""
    return f"{metric}_{steps}step_{label}"


def read_columns(progress_csv, keys, x="samples"):
    """{key: (x values, values)} of logged values against the column `x`; rows without a key, or with a value that is
    not finite (an evaluation whose samples held inf/NaN), are skipped for it."""
    return columns_of(read_progress(progress_csv)[1], keys, x)


def columns_of(rows, keys, x):
    """read_columns of progress.csv rows (cm.logger.read_progress)."""
    out = {}
    for key in keys:
        pairs = [(float(r[x]), float(r[key])) for r in rows if r.get(key, "") != "" and r.get(x, "") != ""]
        pairs = [p for p in pairs if np.isfinite(p).all()]
        out[key] = tuple(np.array(pairs, dtype=np.float64).reshape(-1, 2).T)
    return out


def best_values(progress_csv, x="samples"):
    """{column: (best value, its x, last value, its x)} of every evaluation column: the lowest of a Frechet distance,
    the highest of the others (precision, recall, Inception Score, class accuracy)."""
    keys, rows = read_progress(progress_csv)
    out = {}
    for key, (xs, ys) in columns_of(rows, eval_columns(keys), x).items():
        if len(ys):
            best = int(np.argmin(ys) if EVAL_COLUMN.match(key)["metric"] in DISTANCE_METRICS else np.argmax(ys))
            out[key] = (float(ys[best]), float(xs[best]), float(ys[-1]), float(xs[-1]))
    return out


def eval_columns(keys):
    """The evaluation columns among progress.csv's columns `keys`, in the order metric, network, steps."""
    found = [(m["metric"], m["network"], int(m["steps"]), k) for k in keys if (m := EVAL_COLUMN.match(k))]
    return [k for *_, k in sorted(found)]


def panels_png(panels, path, title="", x_label="step", log_x=False, log_y=(), width=640, panel_height=200, pad=48):
    """One panel per (name, {label: (x, y)}) in `panels`, one line per label, the same color for a label in
    every panel; x on a log scale with `log_x`, y in the panels named in `log_y` (where every value is positive).
    Returns the number of lines drawn (nothing is written if 0)."""
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
        y_scale = np.log if name in log_y and lo > 0 else (lambda v: v)
        y_lo, y_span = y_scale(lo), max(y_scale(hi) - y_scale(lo), 1e-12)
        for label, (x, y) in lines.items():
            px = pad + (scale(x) - x_lo) / x_span * (width - 2 * pad)
            py = bottom - (y_scale(y) - y_lo) / y_span * (bottom - top)
            draw.line(list(zip(px.tolist(), py.tolist())), fill=colors[label], width=2)
            drawn += 1
        if y_scale is np.log:
            draw.text((pad + 4, top + 14), "(log scale)", fill="gray")
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((pad, bottom + 4), f"{x_label} {xs.min():g}", fill="black")
        right = f"{x_label} {xs.max():g}"
        draw.text((width - pad - 7 * len(right), bottom + 4), right, fill="black")
    if drawn:
        atomic_write(path, img.save)
    return drawn


def curves_png(runs, path, keys=None, x="samples", title=""):
    """Logged values against `x` (samples: training images; or step) in one PNG, one panel per key, one line per run
    ({label: progress.csv}), the Frechet distances on a log scale; `keys` default: DEFAULT_KEYS and every evaluation
    column any run has. Returns the number of lines drawn (no file when 0)."""
    if keys is None:
        found = [k for csv_path in runs.values() for k in eval_columns(read_progress(csv_path)[0])]
        keys = list(DEFAULT_KEYS) + list(dict.fromkeys(found))
    columns = {label: read_columns(csv_path, keys, x) for label, csv_path in runs.items()}
    panels = [(key, {label: columns[label][key] for label in runs if len(columns[label][key][0])}) for key in keys]
    distances = [k for k in keys if (m := EVAL_COLUMN.match(k)) and m["metric"] in DISTANCE_METRICS]
    return panels_png(panels, path, title=title, x_label="images" if x == "samples" else x, log_y=distances)
