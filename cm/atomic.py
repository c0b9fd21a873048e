"""Atomic file writes: write to a temporary name beside the target, then rename over it."""

import os


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path to `path`; a crash leaves either the old file or
    none, never half a file. The temporary name keeps the extension (some writers check it)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_failure(path, err):
    """'could not write PATH (why)' for the OSError or RuntimeError (torch.save's writer) of a failed write."""
    return f"could not write {path} ({getattr(err, 'strerror', None) or str(err).splitlines()[0]})"


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
