"""What the entry points (launch/, data_tools/) share: argument types for counts, and the check of the file or
folder a command writes its result to. No torch: they run before the entry points' imports.

    p.add_argument("--steps", type=positive_int)         # 0 or -3: argparse's usage and one error line, exit 2
    out = check_output_file(args.out, "--out", (".png", ".jpg"))    # ConfigError: one sentence naming --out

A count of 0 would otherwise read as "not given" where a flag defaults to the run's value (`--num-samples 0` would
start 50,000 samples). Sampling a grid, exporting weights or scoring 50K samples takes minutes to hours; a result
that cannot be written (a directory given for a file, an unknown extension, a folder that cannot be created or
written) is reported at once instead. The folder is created here, and written to once (a temporary file, removed at
once), so a read-only or full file system fails now, as it would at the end.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Optional, Sequence

from dit_scale.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    return _int_at_least(text, 0, "an integer of at least 0")


def positive_int_list(text: str) -> list:
    """argparse type: comma-separated positive integers ("64,128,256")."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers (e.g. 64,128), got {text!r}") \
            from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers (e.g. 64,128), got {text!r}")
    return values


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def check_output_file(path: Optional[str], flag: str, suffixes: Sequence[str] = ()) -> Optional[str]:
    """`path` (None: the command's default, nothing to check) once it names a writable file ending with one of
    `suffixes` (any, when empty); else a ConfigError naming `flag` and the fix. Creates the file's folder."""
    if path is None:
        return None
    if os.path.isdir(path):
        example = os.path.join(path, "result" + (suffixes[0] if suffixes else ""))
        raise ConfigError(f"{flag} '{path}' is a directory; give a file name, e.g. {flag} {example}.")
    if suffixes and not path.lower().endswith(tuple(suffixes)):
        raise ConfigError(f"{flag} '{path}' must end with {' or '.join(suffixes)}.")
    _check_writable(os.path.dirname(os.path.abspath(path)), flag, path)
    return path


def check_output_dir(path: Optional[str], flag: str) -> Optional[str]:
    """`path` (None: the command's default) once it names a folder the command can make or write in; else a
    ConfigError naming `flag`. Makes nothing: the command makes it once its inputs are checked too."""
    if path is None:
        return None
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} '{path}' is a file; give a folder (it is made if missing).")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} '{path}' cannot be made: {existing} is a file; choose another folder.")
    _check_writable(existing, flag, path, make=False)
    return path


def _check_writable(folder: str, flag: str, path: str, make: bool = True) -> None:
    """Write a temporary file in `folder` (removed at once), after making it (`make`)."""
    try:
        if make:
            os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} '{path}' cannot be written ({e.strerror or e}: {folder}); choose a writable "
                          f"folder.") from None
