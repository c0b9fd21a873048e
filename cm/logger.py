"""Run-folder logging under the published names: configure, log, logkv, logkv_mean, dumpkvs, get_dir.

Rank 0 writes `log.txt` and `progress.csv` in the run folder and prints; other ranks stay quiet
(their key-value means are still averaged across ranks by the caller's reductions, not here).
"""

import csv
import datetime
import os
from collections import defaultdict

from . import dist_util

_dir = None
_kvs = {}
_means = defaultdict(float)
_counts = defaultdict(int)
_csv_keys = None


def configure(dir=None):
    """Use `dir`, else $OPENAI_LOGDIR (as published), else runs/<date-time>; create it."""
    global _dir, _csv_keys
    _dir = dir or os.environ.get("OPENAI_LOGDIR") or os.path.join(
        "runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    )
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
        keys = sorted(row)
        new_header = _csv_keys is None or keys != _csv_keys
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new_header:
                writer.writerow(keys)
            writer.writerow([row[k] for k in keys])
        _csv_keys = keys
    return row


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else str(v)
