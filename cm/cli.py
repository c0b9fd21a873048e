"""What every script's command line shares: typed flags from a defaults dict, and one-line errors.

Expected failures (bad flags, data, checkpoints, a diverged loss) end a script with one line on
stderr and exit status 1 instead of a traceback; CM_TRACEBACK=1 shows the traceback.
"""

import argparse
import math
import os
import sys

from . import dist_util


class NonFiniteLossError(RuntimeError):
    """A float32/bf16 run met an inf/NaN loss (fp16 runs skip such steps instead)."""


EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
                   ImportError, NonFiniteLossError)


# the ranges of number flags, declared beside the flags by their owners (a method's flag_ranges, a network's RANGES,
# the loop's in cm.run_setup): (test, words)
POSITIVE = (lambda v: v > 0, "positive")
NON_NEGATIVE = (lambda v: v >= 0, "0 or positive")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
FINITE = (math.isfinite, "a finite number")


def check_numbers(args, ranges):
    """Every number flag of `args` finite (argparse reads nan and inf) and in its range of `ranges` ({flag: (test,
    words)}, FINITE for the others): one line naming the first that is not."""
    for key, value in sorted(vars(args).items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_number(key, value, *ranges.get(key, FINITE))


def check_ranges(args, ranges):
    """The flags of `ranges` ({flag: (test, words)}) that `args` holds, each finite and in its range: one line."""
    for key in sorted(ranges):
        if hasattr(args, key):
            _check_number(key, getattr(args, key), *ranges[key])


def _check_number(key, value, test, words):
    if not (math.isfinite(value) and test(value)):
        raise ValueError(f"--{key} must be {words}, got {value}")


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (True/False), got {v!r}")


def add_dict_to_argparser(parser, default_dict, helps=None):
    """One --flag per key, typed by its default (booleans take True/False), with its line of `helps` if any."""
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type, **({"help": helps[k]} if helps and k in helps else {}))


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}


def run_cli(main):
    """Run a script's main(), turning the expected failures into one line on stderr and exit status 1."""
    try:
        main()
        dist_util.leave_process_group()
    except EXPECTED_ERRORS as err:
        if os.environ.get("CM_TRACEBACK"):
            raise
        print(f"error: {err} (set CM_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
