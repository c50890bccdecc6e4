"""Test-only fault injection, imported at start-up by every Python process whose PYTHONPATH
starts with this folder (tests/test_disk_faults.py): the file writes the harness makes from
Python fail as a full or a read-only disk would make them fail, without root or a mount.

    LRA_FAULT_DIR=<dir>  LRA_FAULT=enospc|erofs  [LRA_FAULT_NAMES=result.json,...]

Every write-mode open (builtins.open, os.open with O_WRONLY / O_RDWR / O_CREAT) and every
mkdir of a new directory under <dir> raises OSError(ENOSPC / EROFS) naming the path;
LRA_FAULT_NAMES limits it to files of those names (a disk that fills up at the end of a run).
"""

import builtins
import errno
import os

_DIR = os.environ.get("LRA_FAULT_DIR")
_ERRNO = {"enospc": errno.ENOSPC, "erofs": errno.EROFS}.get(os.environ.get("LRA_FAULT", ""))
_NAMES = [n for n in os.environ.get("LRA_FAULT_NAMES", "").split(",") if n]

if _DIR and _ERRNO:
    _root = os.path.realpath(_DIR)
    _open, _os_open, _mkdir = builtins.open, os.open, os.mkdir

    def _hit(path) -> bool:
        try:
            full = os.path.realpath(os.fspath(path))
        except TypeError:  # a file descriptor
            return False
        inside = full == _root or full.startswith(_root + os.sep)
        return inside and (not _NAMES or os.path.basename(full) in _NAMES
                           or any(os.path.basename(full).startswith(f".{n}") for n in _NAMES))

    def _fail(path):
        raise OSError(_ERRNO, os.strerror(_ERRNO), os.fspath(path))

    def open(file, mode="r", *args, **kwargs):  # noqa: A001 - builtins.open's stand-in
        if any(c in mode for c in "wax+") and _hit(file):
            _fail(file)
        return _open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _hit(path):
            _fail(path)
        return _os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if _hit(path) and not _NAMES and not os.path.exists(path):
            _fail(path)
        return _mkdir(path, *args, **kwargs)

    builtins.open, os.open, os.mkdir = open, os_open, mkdir
