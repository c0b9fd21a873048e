"""Run-folder logging under the published names: configure, log, logkv, logkv_mean, dumpkvs, get_dir.

Rank 0 writes `log.txt` and `progress.csv` in the run folder and prints; other ranks stay quiet
(their key-value means are still averaged across ranks by the caller's reductions, not here). Rank 0 also hands each
row, and the images logged with log_image, to the log backends set with set_backends (cm.log_backends).
"""

import csv
import datetime
import os
from collections import defaultdict

from . import dist_util
from .atomic import atomic_write

_dir = None
_kvs = {}
_means = defaultdict(float)
_counts = defaultdict(int)
_csv_keys = None
_backends = []


def run_dir(dir=None):
    """`dir`, else $OPENAI_LOGDIR (as published), else runs/<date-time>."""
    return dir or os.environ.get("OPENAI_LOGDIR") or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f"))


def configure(dir=None):
    """Log to run_dir(dir); create it."""
    global _dir, _csv_keys
    _dir = run_dir(dir)
    os.makedirs(_dir, exist_ok=True)
    _csv_keys = None
    log(f"logging to {_dir}")
    return _dir


def get_dir():
    return _dir


def log(*args):
    if dist_util.get_rank() != 0:
        return
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    if _dir is not None:
        with open(os.path.join(_dir, "log.txt"), "a") as f:
            f.write(line + "\n")


def set_backends(backends):
    """Send every row dumped from now on, and every image logged, to `backends` (cm.log_backends) too, on rank 0."""
    global _backends
    _backends = list(backends) if dist_util.get_rank() == 0 else []


def close_backends():
    global _backends
    for backend in _backends:
        backend.close()
    _backends = []


def log_image(tag, image, step):
    """A uint8 HWC image to the log backends (the run folder keeps its own PNG: the caller writes it)."""
    for backend in _backends:
        backend.image(tag, image, step)


def logkv(key, value):
    _kvs[key] = value


def logkv_mean(key, value):
    _means[key] += float(value)
    _counts[key] += 1


def dumpkvs(echo=True):
    """Print the collected values as a table (unless `echo` is False), append them to progress.csv
    and log.txt, and clear them; returns them."""
    global _csv_keys
    row = dict(_kvs)
    row.update({k: _means[k] / _counts[k] for k in _means})
    _kvs.clear()
    _means.clear()
    _counts.clear()
    if dist_util.get_rank() != 0 or not row:
        return row
    width = max(len(k) for k in row)
    lines = [f"| {k:<{width}} | {_fmt(v):>12} |" for k, v in sorted(row.items())]
    table = "\n".join(["-" * (width + 19)] + lines + ["-" * (width + 19)])
    if echo:
        print(table, flush=True)
    if _dir is not None:
        with open(os.path.join(_dir, "log.txt"), "a") as f:
            f.write(table + "\n")
        path = os.path.join(_dir, "progress.csv")
        if _csv_keys is None or not set(row) <= set(_csv_keys):
            # a new column: the file is rewritten under one header holding every column (blank where absent)
            old_keys, old_rows = read_progress(path)
            _csv_keys = sorted(set(old_keys) | set(row))
            write_progress(path, _csv_keys, old_rows)
        with open(path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in _csv_keys])
    for backend in _backends:
        backend.scalars(row, row.get("step", 0))
    return row


def read_progress(path):
    """(columns, rows as dicts) of a progress.csv; a header repeated mid-file (as older versions wrote after
    a resume) starts new columns. ([], []) when there is no file."""
    if not os.path.exists(path):
        return [], []
    keys, columns, rows = [], [], []
    with open(path, newline="") as f:
        for line in csv.reader(f):
            if line and all(_is_name(v) for v in line):  # a header: names only (a row holds numbers)
                columns = line
                keys += [k for k in line if k not in keys]
            elif line:
                rows.append(dict(zip(columns, line)))
    return keys, rows


def write_progress(path, keys, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(keys)
            writer.writerows([[r.get(k, "") for k in keys] for r in rows])

    atomic_write(path, write)


def continue_progress(step):
    """Where a run resumes at `step` (0: a fresh start in the folder): progress.csv keeps its rows up to that
    step, so the steps logged after the last checkpoint are not logged twice, under one header."""
    global _csv_keys
    if dist_util.get_rank() != 0 or _dir is None:
        return
    path = os.path.join(_dir, "progress.csv")
    keys, rows = read_progress(path)
    if keys:
        kept = {}  # by step, the last row written for it (an older version's resume repeated steps)
        for r in rows:
            if _is_number(r.get("step", "")) and float(r["step"]) <= step:
                kept[float(r["step"])] = r
        write_progress(path, keys, [kept[k] for k in sorted(kept)])
    _csv_keys = keys or None


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _is_name(text):
    return bool(text) and not _is_number(text) and text.replace("_", "").replace("-", "").replace(".", "").isalnum()


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else str(v)
