"""One training run per output folder: the lock (one run writes there at a time) and the claim
(a new run never writes into an earlier run's files).

Two trainers in one folder would interleave their metrics.jsonl rows and overwrite each other's
config and checkpoints. Rank 0 holds an exclusive flock on output_dir/train.lock for as long as the
run writes there; the file records who holds it (pid, host, start time), so a second run is told
which run is in the way, and the lock of a process that died is taken over with a warning (the
kernel drops a dead process's flock; on file systems without flock the recorded pid decides).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

from .checkpoint import CheckpointError
from .distributed import DistributedState, broadcast_object
from .logging_utils import warn

LOCK_NAME = "train.lock"

_HELD: Dict[str, list] = {}
_HELD_GUARD = threading.Lock()


def _holder_info() -> Dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _read_holder(file: Path) -> Dict[str, Any]:
    try:
        holder = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(holder: Dict[str, Any]) -> bool:
    """Whether the recorded holder may still run: a pid on another host cannot be checked."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_use(output_dir: Path, holder: Dict[str, Any]) -> CheckpointError:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
    return CheckpointError(f"output_dir {str(output_dir)!r} is in use by another training run ({who}): two runs in "
                           f"one folder would mix their metrics and checkpoints; wait for it, stop it, or choose "
                           f"another --output_dir (lock file: {output_dir / LOCK_NAME})")


class OutputDirLock:
    """An exclusive lock on an output folder (see `lock_output_dir`); `release()` gives it up."""

    def __init__(self, key: str):
        self.key = key
        self.released = False

    def __del__(self) -> None:
        # A Trainer that failed while starting (or was dropped without train()) lets go of the
        # folder when it is collected, not only when the process ends.
        try:
            self.release()
        except Exception:
            pass

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        with _HELD_GUARD:
            entry = _HELD.get(self.key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[self.key]
            fd = entry[0]
            try:
                # Marked released before the unlock (in close), so the next run knows this one
                # ended cleanly. The file itself stays: removing it would let two runs lock two
                # different files of the same name.
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({**_holder_info(), "released": True}).encode(), 0)
            except OSError:
                pass
            os.close(fd)


def _acquire(output_dir: Path) -> OutputDirLock:
    output_dir.mkdir(parents=True, exist_ok=True)
    key = str(output_dir.resolve())
    import fcntl

    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            return OutputDirLock(key)
        file = output_dir / LOCK_NAME
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _in_use(output_dir, _read_holder(file)) from None
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise CheckpointError(f"cannot lock output_dir {str(output_dir)!r}: {error}") from None
                # No flock on this file system: fall back to the recorded pid.
                holder = _read_holder(file)
                if holder and not holder.get("released") and holder.get("pid") != os.getpid() and _alive(holder):
                    raise _in_use(output_dir, holder) from None
            previous = _read_holder(file)
            if previous.get("pid") is not None and not previous.get("released") and (
                    previous.get("pid"), previous.get("host")) != (os.getpid(), socket.gethostname()):
                warn(f"took over the lock of pid {previous.get('pid')} on {previous.get('host', '?')} (started "
                     f"{previous.get('started', '?')}) on output_dir {str(output_dir)!r}: that run is gone without "
                     f"releasing it (killed?)")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        _HELD[key] = [fd, 1]
        return OutputDirLock(key)


def lock_output_dir(output_dir, state: DistributedState) -> Optional[OutputDirLock]:
    """Collective: rank 0 takes an exclusive lock on output_dir for as long as the run writes
    there (released by `OutputDirLock.release()` or when the process ends; a lock of a process
    that died is taken over with a warning). Every rank raises the same CheckpointError when
    another run holds it. Returns the lock on rank 0, None elsewhere."""
    lock, failure = None, None
    if state.is_main:
        try:
            lock = _acquire(Path(output_dir))
        except CheckpointError as error:
            failure = str(error)
    failure = broadcast_object(failure, state)
    if failure is not None:
        raise CheckpointError(failure)
    return lock


# What a run writes into its output folder (train.lock aside): the files a new run would mix with
# an earlier run's, and all that --overwrite removes (nothing else in the folder is touched).
RUN_FILES = ("metrics.jsonl", "config.yaml", "checkpoints", "samples", "tensorboard", "reward_curve.png",
             "before_after.png", "export", "wandb", "wandb_run_id")


def claim_output_dir(output_dir, overwrite: bool, resume_asked: bool, state: DistributedState) -> None:
    """Collective, for a run that starts fresh (nothing to resume): output_dir must not hold an
    earlier run's files, or `overwrite` removes them first. Every rank raises the same one-line
    CheckpointError naming the ways out."""
    failure = None
    if state.is_main:
        folder = Path(output_dir)
        found = [name for name in RUN_FILES if (folder / name).exists()]
        if found and overwrite:
            for name in found:
                path = folder / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        elif found:
            resume = "it has no checkpoint to resume: " if resume_asked else "continue it with --resume latest, or "
            ways = resume + "choose another --output_dir, or pass --overwrite true to clear it"
            failure = f"output_dir {str(folder)!r} holds an earlier run ({', '.join(found)}); {ways}"
    failure = broadcast_object(failure, state)
    if failure is not None:
        raise CheckpointError(failure)
