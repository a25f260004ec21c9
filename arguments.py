"""Command-line argument checking shared by `attnlab`, `attnlab bench` and `attnlab demo`.

Every value is checked when it is parsed (argparse `type=` functions built on `processors.params`), so a bad
one fails before any model is loaded, with one line that names the option, the value and the valid range:

    attnlab entropy: argument --steps: must be an integer in [1, 1000]; got 0
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from .pipelines.inputs import MAX_GUIDANCE, MAX_STEPS
from .processors.params import MAX_PIXELS, InvalidParameter, integer, interval, number

MAX_SEED = 2**32 - 1  # numpy's and the toy world's seeds are 32-bit
MAX_FRAMES = 1025


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2), without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _checked(check):
    """An argparse type from a check(text) raising InvalidParameter; its message becomes argparse's."""
    def parse(text: str):
        try:
            return check(text)
        except InvalidParameter as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = check.__name__.lstrip("_")
    return parse


def _unnamed(check, value, *args, **kwargs):
    """Run a `processors.params` check with the name left out: argparse puts 'argument --option:' in front."""
    try:
        return check("value", value, *args, **kwargs)
    except InvalidParameter as err:
        raise InvalidParameter(str(err).removeprefix("value ")) from None


def _integer_in(text: str, low: int, high: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise InvalidParameter(f"must be an integer in {interval(low, high)}; got {text!r}") from None
    return _unnamed(integer, value, low, high)


def _number_in(text: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidParameter(f"must be a finite number in {interval(low, high, low_open, high_open)}; "
                               f"got {text!r}") from None
    return _unnamed(number, value, low, high, low_open=low_open, high_open=high_open)


def int_in(low: int, high: int):
    """An argparse type: an integer in [low, high]."""
    def integer_in_range(text: str) -> int:
        return _integer_in(text, low, high)

    return _checked(integer_in_range)


def float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number in the range (open at an end where asked)."""
    def number_in_range(text: str) -> float:
        return _number_in(text, low, high, low_open, high_open)

    return _checked(number_in_range)


steps = int_in(1, MAX_STEPS)
seed = int_in(0, MAX_SEED)
guidance = float_in(0.0, MAX_GUIDANCE)
pixels = int_in(1, MAX_PIXELS)


def _frames(text: str) -> int:
    n = _integer_in(text, 1, MAX_FRAMES)
    if n % 4 != 1:
        raise InvalidParameter(f"must be 4k + 1 frames (Wan's VAE packs 4 frames per latent after the first); "
                               f"got {n}")
    return n


frames = _checked(_frames)


def _size(text: str):
    """HEIGHT, HEIGHTxWIDTH or FRAMESxHEIGHTxWIDTH in pixels -> int or tuple."""
    parts = [p.strip() for p in text.lower().replace("x", ",").split(",")]
    if not text.strip() or not 1 <= len(parts) <= 3 or not all(parts):
        raise InvalidParameter(f"give HEIGHT, HEIGHTxWIDTH or FRAMESxHEIGHTxWIDTH in pixels; got {text!r}")
    if len(parts) == 3:
        return (_frames(parts[0]), *(_integer_in(p, 1, MAX_PIXELS) for p in parts[1:]))
    values = [_integer_in(p, 1, MAX_PIXELS) for p in parts]
    return values[0] if len(values) == 1 else tuple(values)


size = _checked(_size)


def _int_list(text: str) -> list[int]:
    """'0,1,5', '0-3' or 'L7-10' -> integers (non-negative, ascending ranges)."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, dash, hi = part.lstrip("Ll").partition("-")
        try:
            lo_i, hi_i = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise InvalidParameter(f"expected integers like 0,1,2 or ranges like 0-3; got {text!r}") from None
        if hi_i < lo_i or lo_i < 0 or hi_i > 100_000:
            raise InvalidParameter(f"{part!r} in {text!r} is not an ascending range of integers in [0, 100000]")
        out += range(lo_i, hi_i + 1)
    if not out:
        raise InvalidParameter(f"expected integers like 0,1,2 or ranges like 0-3; got an empty list {text!r}")
    return out


int_list = _checked(_int_list)


def float_list_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """Numbers separated by commas (or spaces), each finite and in the range; at least one."""
    def number_list(text: str) -> list[float]:
        parts = text.replace(",", " ").split()
        if not parts:
            raise InvalidParameter(f"expected numbers separated by commas; got {text!r}")
        return [_number_in(p, low, high, low_open, high_open) for p in parts]

    return _checked(number_list)


def _non_empty(text: str) -> str:
    if not text.strip():
        raise InvalidParameter(f"must not be empty; got {text!r}")
    return text


non_empty = _checked(_non_empty)


def _existing_file(text: str) -> str:
    if not text.strip():
        raise InvalidParameter("must name a file; got an empty string")
    if not Path(text).expanduser().is_file():
        raise InvalidParameter(f"no such file: {text!r}")
    return text


existing_file = _checked(_existing_file)


def _output_folder(text: str) -> str:
    """A folder the command can create or write into (checked now, before any work)."""
    if not text.strip():
        raise InvalidParameter("must name a folder; got an empty string")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise InvalidParameter(f"{text!r} exists and is not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidParameter(f"{text!r}: {str(parent)!r} is not a folder")
    try:  # os.access alone says yes to root on read-only file systems and in /proc
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError("permission denied")
        os.rmdir(tempfile.mkdtemp(prefix=".attnlab-write-check-", dir=parent))
    except OSError as err:
        raise InvalidParameter(f"{text!r}: cannot write in {str(parent)!r} ({err.strerror or err})") from None
    return text


output_folder = _checked(_output_folder)


def _device(text: str) -> str:
    """A torch device this machine has: cpu, cuda[:i] (when CUDA is there), mps (when available), ..."""
    import torch

    try:
        device = torch.device(text.strip())
    except (RuntimeError, ValueError, TypeError):
        raise InvalidParameter(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidParameter(f"{text!r}: this torch has no CUDA device (torch {torch.__version__}, "
                                   f"CUDA build: {torch.version.cuda or 'no'}); use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InvalidParameter(f"{text!r}: there are only {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidParameter(f"{text!r}: MPS is not available on this machine; use cpu")
    elif device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise InvalidParameter(f"{text!r}: unsupported device type {device.type!r}; use cpu, cuda or mps")
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise InvalidParameter(f"{text!r}: no XPU device on this machine; use cpu")
    return str(device)


device = _checked(_device)


def _model_name(text: str):
    from .loading import parse_model_name

    return parse_model_name(text)


model_name = _checked(_model_name)
