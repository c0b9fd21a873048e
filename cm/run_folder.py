"""A training run's folder is one run's: a lock file names the process holding it, and what an earlier
process left half-written there (a temporary file of a save it did not finish) is removed on the next start.

The lock is `run.lock` ("HOST PID"), taken by rank 0 with an exclusive create; a second run on the folder is
refused in one line on every rank, while a lock whose process is gone (a SIGKILL leaves it) is taken over.
"""

import atexit
import os
import re
import socket

import torch

from . import dist_util

LOCK_NAME = "run.lock"
TEMPORARY = re.compile(r"\.tmp(\d+)(\.[^.]+)?$")  # cm.atomic's temporary names: NAME.tmpPID.EXT


class RunFolderInUse(ValueError):
    pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(path):
    """(host, pid) of a lock file, or None when it is unreadable (a half-written lock: taken over)."""
    try:
        with open(path) as f:
            host, pid = f.read().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _take(path):
    """Create the lock file for this process; False if another live process holds it."""
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is not None and (holder[0] != socket.gethostname() or _alive(holder[1])):
                if holder == (socket.gethostname(), os.getpid()):
                    return True  # (this process took it already)
                return holder
            os.remove(path)  # its process is gone: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        atexit.register(_release, path)
        return True
    return _holder(path) or ("?", -1)


def _release(path):
    if _holder(path) == (socket.gethostname(), os.getpid()):
        os.remove(path)


def release_run_folder(folder):
    """Give the folder's lock back if this process holds it (also done at exit)."""
    if folder and dist_util.get_rank() == 0:
        _release(os.path.join(folder, LOCK_NAME))


def lock_run_folder(folder):
    """Take `folder`'s lock on rank 0; every rank raises RunFolderInUse if another live run holds it."""
    holder = None
    unwritable = None
    if dist_util.get_rank() == 0:
        try:
            os.makedirs(folder, exist_ok=True)
            taken = _take(os.path.join(folder, LOCK_NAME))
            holder = None if taken is True else taken
        except OSError as err:  # a read-only or foreign folder
            unwritable = err.strerror or str(err)
    code = 2.0 if unwritable else 0.0 if holder is None else 1.0
    refused = dist_util.broadcast_from_rank0(torch.tensor([code], device=dist_util.dev())).item()
    if refused == 2.0:
        raise ValueError(f"cannot write to the run folder {folder} ({unwritable or 'on rank 0'}); "
                         "pass a --log_dir you can write to")
    if refused:
        where = f"process {holder[1]} on {holder[0]}" if holder else "another run"
        raise RunFolderInUse(
            f"the run folder {folder} is in use by {where}; wait for it to finish or stop it, or pass another "
            f"--log_dir (if that process is gone, remove {os.path.join(folder, LOCK_NAME)})"
        )


def remove_stale_temporaries(folder):
    """Delete the temporary files of saves an earlier process of this run did not finish (rank 0; the folder is
    locked, so no other process writes there). Returns their names."""
    if dist_util.get_rank() != 0 or not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        match = TEMPORARY.search(name)
        if match and int(match.group(1)) != os.getpid():
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed
