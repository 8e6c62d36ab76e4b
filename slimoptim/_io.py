"""Crash-safe file writes: a file appears complete at its path, or not at all.

Every file slimoptim writes goes through :func:`atomic_path` (writers that take a
file name) or :func:`atomic_open` (writers that take a file object). The data go
to a temporary file in the target's folder (same filesystem, so the rename is
atomic), which is flushed and fsynced, then renamed over the target with
``os.replace``, and the folder is fsynced so the rename itself survives a power
cut. An exception, a kill or a full disk at any point leaves the previous file
at the path untouched; a full disk (or file-size limit) is reported with the
path and the bytes the file needed.

This module imports nothing from slimoptim, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterator

# errno values that mean "the data did not fit": no space, file-size limit, quota.
_OUT_OF_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_OS_ERROR_IN_MESSAGE = re.compile(r"os error (\d+)")  # how Rust writers (safetensors) say it
TEMP_MARKER = ".slimoptim-tmp-"


def _temp_name(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}{TEMP_MARKER}{secrets.token_hex(4)}")


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A folder that cannot be synced at all (some FUSE and network filesystems): nothing to do.
_FOLDER_SYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable. Not possible (nor needed) on Windows.

    It runs after the new file has replaced the old one, so a failure here must not report
    the save as failed: the file is there. A filesystem that cannot sync folders is
    skipped; any other error (EIO, EACCES) becomes a warning that the rename may not
    survive a power loss."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        if error.errno in _FOLDER_SYNC_UNSUPPORTED:
            return
        warnings.warn(
            f"the file in {folder or '.'!r} was written and is in place, but the folder could "
            f"not be synced ({error}): the new file may not survive a power loss.",
            stacklevel=4,
        )


def _out_of_space_errno(error: BaseException) -> int | None:
    """The errno of a full-disk / too-large error anywhere in ``error``'s chain, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE:
            return error.errno
        match = _OS_ERROR_IN_MESSAGE.search(str(error))
        if match and int(match.group(1)) in _OUT_OF_SPACE:
            return int(match.group(1))
        error = error.__cause__ or error.__context__
    return None


def _out_of_space_message(path: str, code: int, written: int, size_hint: int | None) -> str:
    folder = os.path.dirname(path) or "."
    try:
        free = f"{shutil.disk_usage(folder).free:,} bytes are free there"
    except OSError:
        free = "the free space there is unknown"
    need = (
        f"it needs about {size_hint:,} bytes"
        if size_hint is not None and size_hint > written
        else f"it needs more than {written:,} bytes"
    )
    return (
        f"cannot write {path!r}: {os.strerror(code)} after {written:,} bytes; {need} and "
        f"{free}. Free space (or raise the file-size limit) and save again; the previous file "
        "at that path is unchanged."
    )


@contextlib.contextmanager
def atomic_path(path, size_hint: int | None = None) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; on success it replaces ``path``.

    The caller writes the whole file under the yielded name. On any exception the
    temporary file is removed and ``path`` is left as it was; a full disk or a
    file-size limit becomes an ``OSError`` naming ``path`` and the bytes needed
    (``size_hint``, if the caller knows it).
    """
    path = os.fspath(path)
    temp = _temp_name(path)
    try:
        yield temp
        _fsync_file(temp)
        os.replace(temp, path)
    except BaseException as error:
        written = os.path.getsize(temp) if os.path.exists(temp) else 0
        with contextlib.suppress(OSError):
            os.remove(temp)
        code = _out_of_space_errno(error)
        if code is not None:
            raise OSError(code, _out_of_space_message(path, code, written, size_hint)) from error
        raise
    _fsync_folder(os.path.dirname(path))


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", size_hint: int | None = None, **kwargs):
    """``open(path, mode)`` for writing, made atomic as :func:`atomic_path` describes."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes whole files: mode must start with 'w', got {mode!r}")
    with atomic_path(path, size_hint) as temp, open(temp, mode, **kwargs) as file:
        yield file


def write_text(path, text: str, encoding: str = "utf-8") -> None:
    """Atomically write ``text`` to ``path``."""
    data = text.encode(encoding)
    with atomic_open(path, "wb", size_hint=len(data)) as f:
        f.write(data)
