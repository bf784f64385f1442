"""Errors the user can fix, and the strict readers of user files.

`UserError` is bad input from the user (a path, a file, a key, a flag): the command lines
print it as one line and exit with status 2, with no traceback. `ArgumentParser` does the
same for bad flags. The readers name the file (and the line) on any problem.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


class UserError(ValueError):
    """Bad input from the user (a path, a file, a key): printed as one line, exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """Bad flags are one line, `error: ...`, exit status 2 (argparse would print its usage too).
    Subcommand parsers inherit it."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def exit_status(command) -> int:
    """Runs command(): 0 when it returns, 2 with `error: ...` on one line when it raises a UserError."""
    try:
        command()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------
# Reading user files: one line naming the file (and the line) on any problem


def decode_utf8(raw: bytes, path: str | os.PathLike) -> str:
    """The text of a file's bytes (a leading UTF-8 BOM dropped); bad bytes stop with `path:line`."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); "
                        f"save the file as UTF-8") from None


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents; unreadable files and bad bytes are UserErrors."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None
    return decode_utf8(raw, path)


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file whose top level must be an object (config.json, an index, adapter_config.json)."""
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object {{...}}, got {json_type(value)}")
    return value


def json_type(value) -> str:
    """How JSON would call a parsed value's type, for messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def is_int(value) -> bool:
    """An integer and not a boolean (in Python True == 1 is an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_json(path: Path):
    """A JSON file the project wrote (config.json, results.json, summary.json); unreadable: a UserError."""
    text = read_text(path)  # unreadable, or not UTF-8: one line naming the file
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: cannot read ({type(err).__name__}: {err})") from None
