"""The error contract of every entry point and tool: bad input is one line and exit status 2, a bug is a traceback.

`pretrain.py`, `inference.py`, `convert_mm_to_ckpt.py` and every `python -m mindspeed_mm_osp.tools.*` module wrap
their `main` in `entry_point(name)`. A domain error (a `UserError`: a config key, a flag value, a data or
checkpoint file, a path) is printed as `NAME: error: MESSAGE` on one line and exits 2; the message names the file,
key or flag and the fix. A collective that fails because another rank died or hung is one line too (exit 4).
Anything else is a bug: its traceback is kept and one line asks to report it (exit 1).
Code raising a domain error from a lower-level exception chains it (`raise ... from exc`) so a debugger still sees
the cause.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

EXIT_USER_ERROR = 2
EXIT_BUG = 1
EXIT_LOST_PEER = 4  # another rank died or hung (3 is pretrain.py's "stopped after too many skipped steps")
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE, what `cat` and `grep` report when the reader (e.g. `head`) has gone


class UserError(Exception):
    """Bad input found at the edge (a flag value, a path, a file's content); the message names it and the fix.

    Every domain error derives from it (config, parallel layout, checkpoint, data read, feature cache, VAE keys),
    so the boundary catches this one type and this module imports nothing of the package."""


def one_line(error: BaseException) -> str:
    """The message of `error` on one line; an OSError names its file (`PATH: No such file or directory`)."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the worker's own last line says it
        text = text.strip().splitlines()[-1]
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


# Words of gloo/NCCL/HCCL errors that mean a peer rank exited or stopped answering (not a bug of this rank).
_LOST_PEER_WORDS = ("Connection closed by peer", "Connection reset", "remote worker", "Timed out waiting",
                    "Broken pipe", "NCCL communicator was aborted", "Watchdog caught collective operation timeout")


def _is_lost_peer(error: BaseException) -> bool:
    """A collective failed because another rank died or hung (`torch.distributed.DistBackendError` or the
    backends' RuntimeError words)."""
    torch = sys.modules.get("torch")
    backend_error = getattr(getattr(torch, "distributed", None), "DistBackendError", ())
    return (bool(backend_error) and isinstance(error, backend_error)) or (
        isinstance(error, RuntimeError) and any(w in str(error) for w in _LOST_PEER_WORDS))


def _is_environment_error(error: BaseException) -> bool:
    """An OSError about a named file (missing, not writable, disk full): the user's environment, not a bug."""
    return isinstance(error, OSError) and error.filename is not None


def _stdout_closed() -> bool:
    """True when the reader of our stdout has gone (`tool | head`): stop quietly, the output was not wanted.

    A pipe whose reader closed polls as an error; stdout is then pointed at /dev/null so the interpreter's own
    flush at exit does not raise again."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        closed = any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real file behind stdout (captured, detached)
        return False
    if closed:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return closed


def entry_point(name: str) -> Callable:
    """Decorator for a `main(argv=None)`: the one error boundary of the entry points and tools (module docstring)."""
    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(argv=None):
            try:
                return main(argv)
            except UserError as e:
                print(f"{name}: error: {one_line(e)}", file=sys.stderr, flush=True)
                raise SystemExit(EXIT_USER_ERROR) from None
            except BrokenPipeError:
                if not _stdout_closed():
                    raise
                raise SystemExit(EXIT_CLOSED_PIPE) from None
            except Exception as e:  # noqa: BLE001 - the boundary: a bug keeps its traceback
                if _is_environment_error(e):
                    print(f"{name}: error: {one_line(e)}", file=sys.stderr, flush=True)
                    raise SystemExit(EXIT_USER_ERROR) from None
                if _is_lost_peer(e):
                    print(f"{name}: error: lost contact with another rank (it exited, or hung longer than the "
                          f"distributed timeout); see that rank's own error: {one_line(e)}", file=sys.stderr,
                          flush=True)
                    raise SystemExit(EXIT_LOST_PEER) from None
                traceback.print_exc()
                print(f"{name}: internal error ({type(e).__name__}): this is a bug, not a problem with your input; "
                      f"please report it with the traceback above", file=sys.stderr, flush=True)
                raise SystemExit(EXIT_BUG) from None
        return run
    return wrap


# ---------------------------------------------------------------------------------------- checks at the edge


def check_number(flag: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise UserError naming `flag` unless `value` is finite and inside the stated range (None: not given)."""
    if value is None:
        return
    ok = math.isfinite(value) and (low is None or (value > low if low_open else value >= low)) and \
        (high is None or (value < high if high_open else value <= high))
    if not ok:
        raise UserError(f"{flag} must be {describe_range(low, high, low_open, high_open)}, got {value}")


def describe_range(low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
                   high_open: bool = False) -> str:
    """"in [0, 1)", ">= 1", "> 0", "<= 8" or "finite"."""
    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{num(low)}, {num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {num(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {num(high)}"
    return "finite"


def is_text(text: str) -> bool:
    """Valid Unicode: bytes that were not UTF-8 (in a file read with surrogateescape, or on the command line)
    arrive as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def env_int(name: str, default: int, low: int = 0) -> int:
    """An integer environment variable set by the launcher (WORLD_SIZE, RANK), refused naming it when it is not an
    integer >= `low`."""
    text = os.environ.get(name, str(default)).strip()
    if not text.lstrip("-").isdigit() or int(text) < low:
        raise UserError(f"{name} (environment) must be an integer >= {low}, got {text!r}; launch with torchrun or "
                        "unset it")
    return int(text)


def check_ranges(values: dict, ranges: dict) -> None:
    """Check every `flag -> value` against its `flag -> dict(low=..., high=..., ...)` entry of a range table."""
    for flag, bounds in ranges.items():
        check_number(flag, values.get(flag), **bounds)


def check_input_path(what: str, path, kind: str = "any") -> Path:
    """`path` exists and is a file (`kind="file"`), a folder (`"dir"`) or either; raise UserError naming `what`."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {path}: does not exist; give an existing {_kind(kind)}")
    if kind == "file" and not p.is_file():
        raise UserError(f"{what} {path}: is a folder, expected a file")
    if kind == "dir" and not p.is_dir():
        raise UserError(f"{what} {path}: is a file, expected a folder")
    return p


def check_output_dir(what: str, path, *, overwrite: bool, taken: Callable[[Path], bool] = lambda p: True) -> Path:
    """An output folder: not a file, writable where it exists, and not already holding outputs (`taken`) unless
    `--overwrite`; raise UserError naming `what`."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {path}: is a file, expected a folder (absent or empty)")
    parent = next((q for q in (p, *p.parents) if q.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise UserError(f"{what} {path}: {parent} is not writable; choose another folder")
    if p.is_dir() and not overwrite and any(taken(child) for child in p.iterdir()):
        raise UserError(f"{what} {path}: already holds outputs; choose an empty folder or pass --overwrite")
    return p


def _kind(kind: str) -> str:
    return {"file": "file", "dir": "folder"}.get(kind, "file or folder")


__all__ = ["EXIT_BUG", "EXIT_LOST_PEER", "EXIT_USER_ERROR", "UserError", "check_input_path", "check_number",
           "check_output_dir",
           "check_ranges", "describe_range", "entry_point", "env_int", "is_text", "one_line"]
