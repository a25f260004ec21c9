"""Which exceptions are the user's (exit code 2, one line on stderr) and which are bugs (their traceback).

A user error is
- a `processors.params.InvalidParameter` (attnlab's own parameter checks, a ValueError; its TypeError kind too);
- a ValueError or NotImplementedError that attnlab code raised itself with a `raise` statement (validation and
  "this model cannot do that" messages), not one that escaped from torch or diffusers or came from a slip such
  as a failed unpacking inside attnlab;
- an OSError about a named file (unwritable output, a missing or unreadable input file, a full disk).
Anything else is internal and keeps its traceback.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Callable

from .processors.params import InvalidParameter

PACKAGE_ROOT = Path(__file__).resolve().parent
_THIRD_PARTY_PARTS = {".venv", "site-packages", "dist-packages"}


def _raised_by_attnlab(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    path = Path(last.filename).resolve()
    inside = path.is_relative_to(PACKAGE_ROOT) and not _THIRD_PARTY_PARTS & set(path.relative_to(PACKAGE_ROOT).parts)
    return inside and (last.line or "").lstrip().startswith("raise")


def is_user_error(err: BaseException) -> bool:
    if isinstance(err, InvalidParameter):
        return True
    if isinstance(err, (ValueError, NotImplementedError)):
        return _raised_by_attnlab(err)
    if isinstance(err, OSError):
        return err.filename is not None
    return False


def run_reporting_user_errors(prog: str, work: Callable[[], int], interrupted_hint: str = "") -> int:
    """`work()`'s exit code; a user error is printed as one line '<prog>: <message>' and gives 2, Ctrl-C gives
    130; anything else propagates with its traceback."""
    try:
        return work()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{interrupted_hint}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - sorted, and re-raised when it is not the user's
        if not is_user_error(err):
            raise
        print(f"{prog}: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.strerror or type(err).__name__}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())
