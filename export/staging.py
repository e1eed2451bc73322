"""Writing a whole folder or nothing: staged beside its destination, published with one rename.

A staging folder ``.{name}.staging-{pid}`` is made in the destination's parent (the same file
system, so publishing is one ``os.rename``); an error or Ctrl-C removes it, and one left by a
killed process (its pid no longer alive) is removed by the next export to the same destination.

A signal handler that raises ``KeyboardInterrupt`` can land where Python swallows exceptions (a
weakref callback, ``__del__``), so the CLI also calls ``request_stop``: ``check_stop`` (at every
export stage and before publishing) raises it again, and a folder is never published after a stop.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path

_stop = threading.Event()


def request_stop() -> None:
    """Record that the process was asked to stop (SIGTERM / Ctrl-C)."""
    _stop.set()


def check_stop() -> None:
    """Raise ``KeyboardInterrupt`` if a stop was requested, even one whose first raise was swallowed."""
    if _stop.is_set():
        raise KeyboardInterrupt


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:           # someone else's live process
        return True
    return True


def remove_stale(dest: Path) -> list[Path]:
    """Staging folders of ``dest`` left by processes that are gone → removed (returned)."""
    removed = []
    for p in dest.parent.glob(f".{dest.name}.staging-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if p.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_destination(dest: str | os.PathLike) -> None:
    """``dest`` can receive a new folder: it does not exist, or is an empty folder."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        what = "a file" if not dest.is_dir() else "not empty"
        raise FileExistsError(f"{dest} exists and is {what}: choose a new folder or delete it first")


@contextlib.contextmanager
def staged_folder(dest: str | os.PathLike):
    """Yield an empty staging folder; when the block ends without an error it becomes ``dest``
    (which must not exist, or be an empty folder), else it is removed."""
    dest = Path(dest)
    check_destination(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest)
    staging = dest.parent / f".{dest.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        check_stop()
        if dest.exists():
            dest.rmdir()              # empty (checked above; a race makes this fail loudly)
        os.rename(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
