"""How a point ends: the failure classifier of lra.sweep.executor's points.

`exception_status` for an exception a process caught itself, and `settle`, which writes the row
of a point that ended without writing its own (`death_status`: a signal is `oom` only with the
kernel's OOM-kill counter as evidence). `enter_point` arms PR_SET_PDEATHSIG in every worker
process, so none outlives its executor. The timeout rule (SIGUSR1, then SIGKILL `POINT_GRACE_S`
later) is lra.sweep.executor's.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from lra.results import RunResult, Status, write_result

log = logging.getLogger(__name__)

POINT_GRACE_S = 60.0  # after SIGUSR1, time for a point to checkpoint, test and write its row
# XLA's allocator messages (and Python's): what counts as out-of-memory in an error's text.
# RESOURCE_EXHAUSTED alone does not: TensorStore (orbax) reports a full disk with it.
OOM_TEXT = ("Out of memory", "out of memory", "MemoryError", "Failed to allocate",
            "failed to allocate", "Allocator (")
# Disk faults by errno, and as C++ libraries (TensorStore, XLA) spell them in their messages.
DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
               errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}
DISK_TEXT = {"No space left on device": "no space left on device",
             "os_error_code='28'": "no space left on device",
             "Read-only file system": "read-only file system",
             "os_error_code='30'": "read-only file system",
             "Disk quota exceeded": "disk quota exceeded"}


def disk_fault(err: BaseException | str) -> str | None:
    """'no space left on device' / 'read-only file system' / ... when `err` (an exception, its
    chain, or a log's text) is a fault of the disk a run writes to, else None."""
    seen = 0
    while isinstance(err, BaseException) and seen < 8:
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return DISK_ERRNOS[err.errno]
        text = str(err)
        found = next((why for t, why in DISK_TEXT.items() if t in text), None)
        if found:
            return found
        err, seen = err.__cause__ or err.__context__, seen + 1
    if isinstance(err, str):
        return next((why for t, why in DISK_TEXT.items() if t in err), None)
    return None


def said_oom(text: str) -> str | None:
    """The out-of-memory phrase in `text` (an error message or a log's tail), unless the text is
    a disk fault's."""
    if disk_fault(text):
        return None
    return next((t for t in OOM_TEXT if t in text), None)


def exception_status(err: BaseException) -> Status:
    """oom for MemoryError and XLA's out-of-memory errors (its allocator's message), else error:
    a full or read-only disk is an `error` (re-run once space is freed), never `oom`."""
    if disk_fault(err):
        return Status.ERROR
    return Status.OOM if isinstance(err, MemoryError) or said_oom(f"{type(err).__name__} {err}") \
        else Status.ERROR


def one_line(err: BaseException, limit: int = 2000) -> str:
    why = disk_fault(err)
    if why:  # TensorStore's messages carry a whole JSON spec: the path and the fault suffice
        return f"{why} while writing {written_path(err) or 'a file'}; free space (or write " \
               f"elsewhere) and re-run: it resumes from its last checkpoint"
    return f"{type(err).__name__}: {' '.join(str(err).split())[:limit]}"


def written_path(err: BaseException) -> str | None:
    """The file a disk fault happened on: OSError's filename, or the first quoted absolute path
    of a TensorStore message."""
    while err is not None:
        if isinstance(err, OSError) and err.filename:
            return str(err.filename)
        match = re.search(r'"(/[^"]+)"', str(err))
        if match:
            return match.group(1)
        err = err.__cause__ or err.__context__
    return None


def unwritable(path: Path | str, err: OSError, then: str = "") -> str:
    """The one line for a write that failed on a disk fault (or any OSError): the file, the
    fault, its remedy, then `then`."""
    why = disk_fault(err) or err.strerror or str(err)
    fix = "free space" if why in ("no space left on device", "disk quota exceeded") else \
        "make it writable"
    name = err.filename and Path(err.filename).name
    target = path if not name or name.startswith(f".{Path(path).name}.") else err.filename
    return f"cannot write {target}: {why}; {fix}" + (f" {then}" if then.startswith("or ") else f"; {then}" if then else "")


@dataclasses.dataclass
class Ended:
    """How a point process ended."""

    code: int                   # exit code (negative: killed by that signal)
    overran: str | None         # past the timeout: None | "stopped" (by SIGUSR1) | "killed"
    received: list[int]         # signals the launcher received and passed on
    oom_before: tuple[str, int] | None
    oom_after: tuple[str, int] | None
    wall_time_s: float
    log_path: Path | None = None  # the point's log, and its size before the point started
    log_start: int = 0

    def log_tail(self, size: int = 8192) -> str:
        """The end of what the point wrote to its log (never an earlier attempt's lines)."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                end = f.seek(0, os.SEEK_END)
                f.seek(max(end - size, self.log_start))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


class Orphaned(SystemExit):
    """The launcher ended before this point process armed PR_SET_PDEATHSIG."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def enter_point(parent_pid: str) -> None:
    """First thing in a point process: get SIGTERM when the launcher dies (kill -9 included);
    raise Orphaned (exit 128 + SIGTERM) if it is already gone."""
    try:  # PR_SET_PDEATHSIG (Linux); a no-op where prctl is unavailable
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass
    if os.getppid() != int(parent_pid):
        raise Orphaned


def death_status(code: int, received: list[int], oom_before: tuple[str, int] | None,
                 oom_after: tuple[str, int] | None, log_tail: str = "",
                 then: str = "a re-run of the sweep resumes it from its last checkpoint",
                 launcher: str = "this sweep") -> tuple[Status, str]:
    """(status, error) for a point process that ended with exit `code` without writing a row.
    `oom` only with evidence: the kernel's OOM-kill counter rose meanwhile, or the point's log
    ends in an out-of-memory error (an XLA abort)."""
    if received:
        return Status.INTERRUPTED, (f"{launcher} received {signal.Signals(received[0]).name} and "
                                    f"the point ended (exit code {code}) before recording it")
    signum = -code if code < 0 else code - 128 if code > 128 else 0
    oom, disk = said_oom(log_tail), disk_fault(log_tail)
    tail = " ".join(log_tail.strip().splitlines()[-3:])[-1000:]
    if oom:
        return Status.OOM, f"exit {code}, and its log says {oom}: {tail}"
    if disk:
        return Status.ERROR, (f"exit {code}, and its log says {disk}: free space (or write "
                              f"elsewhere) and {then.removeprefix('a ')}: {tail[-300:]}")
    if not signum:
        return Status.ERROR, (f"the point's process ended with exit code {code} without writing a "
                              f"result" + (f": {tail}" if tail else ""))
    name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
    rose = (oom_before is not None and oom_after is not None and oom_before[0] == oom_after[0]
            and oom_after[1] > oom_before[1])
    if signum == signal.SIGKILL and rose:
        return Status.OOM, (f"SIGKILLed by the kernel's out-of-memory killer ({oom_after[0]}: "
                            f"oom_kill {oom_before[1]} -> {oom_after[1]} while it ran)")
    where = f"{oom_after[0]} counted none" if oom_after else "no OOM counter is readable here"
    return Status.KILLED, (f"the point's process was killed by {name}, not by {launcher}, and the "
                           f"kernel recorded no OOM kill ({where}): preemption, a job limit or a "
                           f"manual kill; {then}")


def settle(out_dir: Path, ended: Ended, before_mtime: int | None, blank: Callable[[], RunResult],
           timeout_key: str, timeout_s: float, then: str,
           annotate: Callable[[RunResult], None] | None = None,
           launcher: str = "this sweep") -> RunResult:
    """The row of a point that has ended: its own result.json when it wrote one that tells the
    truth; else (it wrote none, or it was still `interrupted` by our SIGUSR1 past the timeout) a
    row written here, starting from `blank()` (or the point's metrics so far), with the status
    and a one-line error that says why and what a re-run does; `annotate` adds to it."""
    path = out_dir / "result.json"
    wrote = path.is_file() and path.stat().st_mtime_ns != before_mtime
    recorded = RunResult(**json.loads(path.read_text())) if wrote else None
    if ended.overran and (recorded is None or recorded.status == Status.INTERRUPTED):
        result = recorded or blank()
        result.status, result.time_limit = Status.TIMEOUT.value, timeout_key
        result.error = (f"the point ran past {timeout_key}={timeout_s:g} and "
                        + (f"did not stop within {POINT_GRACE_S:g} s of SIGUSR1 (hung outside its "
                           f"step loop, e.g. in XLA), so it was SIGKILLed"
                           if ended.overran == "killed" else
                           "ended before it could record its timeout") + f"; {then}")
    elif recorded is None:
        result = blank()
        status, result.error = death_status(ended.code, ended.received, ended.oom_before,
                                            ended.oom_after, ended.log_tail(), then, launcher)
        result.status = status.value
    else:
        return recorded
    if annotate is not None:
        annotate(result)
    result.error += f"; log: {ended.log_path}"
    result.wall_time_s = ended.wall_time_s
    from lra.train.tracking import summary  # loads JAX: only a dead point's row needs it

    print(f"{summary(result)}: {result.error}", file=sys.stderr)  # rounded, as a run's own line
    try:
        write_result(result, out_dir)
    except OSError as err:  # a full or read-only disk: say so once; the sweep goes on
        print(unwritable(out_dir / "result.json", err, "this point has no row until it is re-run"),
              file=sys.stderr)
    return result


def oom_kill_count() -> tuple[str, int] | None:
    """(file, count) of the kernel's OOM kills where this process's memory is accounted: its
    cgroup's memory.events (v2) or memory.oom_control (v1), else the host's /proc/vmstat. A
    point inherits its launcher's cgroup, and the kernel counts a kill there whether the cgroup's
    limit or the whole host ran out."""
    candidates = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            rel = rel.lstrip("/")
            if controllers == "":
                candidates += [Path("/sys/fs/cgroup") / rel / "memory.events",
                               Path("/sys/fs/cgroup/memory.events")]
            elif "memory" in controllers.split(","):
                candidates += [Path("/sys/fs/cgroup/memory") / rel / "memory.oom_control",
                               Path("/sys/fs/cgroup/memory/memory.oom_control")]
    except (OSError, ValueError):
        pass
    for path in [*candidates, Path("/proc/vmstat")]:
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return str(path), int(value)
        except (OSError, ValueError):
            continue
    return None
