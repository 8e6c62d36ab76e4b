"""Crash-safe saving: after an exception, a kill at any point or a full disk, the previous
file at the path loads as before, and no temporary file is left behind by an exception."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import stat
import warnings

import pytest
import safetensors.torch
import torch
from checkpoint_common import assert_same_tensors, build, new_seed, train

from slimoptim import _io, checkpoint

posix_only = pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals and rlimits")


def trained(seed: int):
    model, opt, sched = build("AdamW", torch.bfloat16, 24, 8, seed=seed)
    train(model, opt, sched, range(2), seed)
    return model, opt, sched


def assert_loads_as(path, model, opt, sched, extra) -> None:
    """``path`` loads into fresh objects and holds exactly ``model``/``opt`` and ``extra``."""
    fresh = build("AdamW", torch.bfloat16, 24, 8, seed=new_seed())
    assert checkpoint.load_checkpoint(path, *fresh) == extra
    assert_same_tensors(model.state_dict(), fresh[0].state_dict())
    want, got = opt.state_dict()["state"], fresh[1].state_dict()["state"]
    for index, entry in want.items():
        assert_same_tensors(entry, got[index])


def save_three_files(folder, model, opt, sched) -> dict:
    """A checkpoint (extra {"version": 1}), a safetensors and a text file: {path: bytes}."""
    ckpt, weights, text = folder / "ckpt.pt", folder / "w.safetensors", folder / "r.json"
    checkpoint.save_checkpoint(ckpt, model, opt, sched, extra={"version": 1})
    checkpoint.save_model(model, weights)
    _io.write_text(text, '{"version": 1}\n')
    return {p: p.read_bytes() for p in (ckpt, weights, text)}


def test_an_exception_while_writing_leaves_the_previous_files(tmp_path, monkeypatch):
    """Issue case 2: the save wrote in place, so a failed save truncated the last good file."""
    model, opt, sched = trained(new_seed())
    saved = save_three_files(tmp_path, model, opt, sched)
    ckpt, weights, text = saved
    newer, newer_opt, newer_sched = trained(new_seed())
    real_save, real_save_file = torch.save, safetensors.torch.save_file

    def save_half_then_fail(obj, f, *args, **kwargs):
        if hasattr(f, "getvalue"):  # the in-memory loadability check of extra
            return real_save(obj, f, *args, **kwargs)
        real_save(obj, f, *args, **kwargs)
        f.seek(f.tell() // 2)
        f.truncate()
        raise RuntimeError("interrupted")

    def save_file_half_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file_half_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        checkpoint.save_checkpoint(ckpt, newer, newer_opt, newer_sched, extra={"version": 2})
    with pytest.raises(RuntimeError, match="interrupted"):
        checkpoint.save_model(newer, weights)
    with pytest.raises(KeyboardInterrupt), _io.atomic_open(text, "w") as f:
        f.write('{"version": ')
        raise KeyboardInterrupt
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in saved} == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in saved)
    assert_loads_as(ckpt, model, opt, sched, {"version": 1})


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    _io.write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------ kill -9


def in_forked_child(work) -> tuple[int, str]:
    """Run ``work()`` in a fork of this process (no re-import); (wait status, its output)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            result = work()
            os.write(write_end, json.dumps(result).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    return status, output


def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)


class DyingFile:
    """A file that is killed (SIGKILL) once ``limit`` bytes have been written to it."""

    def __init__(self, file, limit: int):
        self.file, self.left = file, limit

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) >= self.left:
            self.file.write(data[: self.left])
            self.file.flush()
            die()
        self.left -= len(data)
        return self.file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)


def kill_at(point: str, monkeypatch, file_size: int) -> None:
    """Arrange for this (forked) process to be killed at ``point`` of the next save."""
    if point.startswith("byte"):
        real_open = open
        limit = {"byte0": 0, "byte4096": 4096, "byte-half": file_size // 2}[point]
        dying_open = lambda *a, **k: DyingFile(real_open(*a, **k), limit)  # noqa: E731
        monkeypatch.setattr(_io, "open", dying_open, raising=False)
    elif point == "before-fsync":
        monkeypatch.setattr(_io, "_fsync_file", die)
    elif point == "before-rename":
        monkeypatch.setattr(os, "replace", die)
    elif point == "before-folder-fsync":
        monkeypatch.setattr(_io, "_fsync_folder", die)


KILL_POINTS = ["byte0", "byte4096", "byte-half", "before-fsync", "before-rename"]


@posix_only
@pytest.mark.parametrize("point", [*KILL_POINTS, "before-folder-fsync"])
def test_a_kill_at_any_point_of_a_save_leaves_a_loadable_checkpoint(tmp_path, point):
    """SIGKILL while writing (first byte, mid-file, before fsync, before the rename, after
    the rename): the path holds the previous checkpoint, or the new one once renamed."""
    old, new = trained(new_seed()), trained(new_seed())
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, *old, extra={"version": 1})

    def save_and_get_killed():
        with pytest.MonkeyPatch.context() as monkeypatch:
            kill_at(point, monkeypatch, path.stat().st_size)
            checkpoint.save_checkpoint(path, *new, extra={"version": 2})
        return "not killed"

    status, output = in_forked_child(save_and_get_killed)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, output
    if point == "before-folder-fsync":  # renamed: the new checkpoint is complete
        assert_loads_as(path, *new, {"version": 2})
    else:
        assert_loads_as(path, *old, {"version": 1})
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt.pt"]
        assert len(leftovers) == 1 and _io.TEMP_MARKER in leftovers[0]


# -------------------------------------------------------------- full disk


@posix_only
def test_a_full_disk_names_the_path_and_the_bytes_needed_and_keeps_the_old_file(tmp_path):
    """Issue case 2: the error read 'basic_ios::clear: iostream error', the file truncated."""
    import resource  # noqa: PLC0415  (POSIX only)

    model, opt, sched = trained(new_seed())
    saved = save_three_files(tmp_path, model, opt, sched)
    ckpt, weights, text = saved
    new = trained(new_seed())
    reference = tmp_path / "reference"
    reference.mkdir()
    checkpoint.save_checkpoint(reference / "ckpt.pt", *new, extra={"v": 2})
    full_size = (reference / "ckpt.pt").stat().st_size
    limit = 1000  # bytes; each new file is larger

    def save_past_the_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # as if the disk were full
        messages = {}
        for path, save in [
            (ckpt, lambda p: checkpoint.save_checkpoint(p, *new, extra={"v": 2})),
            (weights, lambda p: checkpoint.save_model(new[0], p, new[1], fp32=True)),
            (text, lambda p: _io.write_text(p, "x" * (2 * limit))),
        ]:
            try:
                save(path)
                messages[path.name] = None
            except OSError as error:
                messages[path.name] = str(error)
        return messages

    status, output = in_forked_child(save_past_the_limit)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, output
    messages = json.loads(output)
    for name, message in messages.items():
        assert message is not None, f"{name} was written past the limit"
        assert re.search(rf"cannot write '.*{re.escape(name)}': File too large", message)
        assert "the previous file at that path is unchanged" in message
    needed = int(re.search(r"needs about ([\d,]+) bytes", messages["ckpt.pt"])[1].replace(",", ""))
    assert full_size <= needed <= full_size + 128 * 1024
    assert {p: p.read_bytes() for p in saved} == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["reference", *(p.name for p in saved)]
    )
    assert_loads_as(ckpt, model, opt, sched, {"version": 1})


@pytest.mark.parametrize("code, warns", [(errno.EINVAL, False), (errno.EIO, True)])
def test_a_failed_folder_sync_after_the_rename_does_not_fail_the_save(
    tmp_path, monkeypatch, code, warns
):
    """The new file is in place once renamed: a folder fsync that fails afterwards must not
    report the save as failed (EINVAL from some FUSE/network filesystems is skipped; any
    other error is a warning), and the file holds the new checkpoint."""
    model, opt, sched = trained(new_seed())
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, model, opt, sched, extra={"v": 1})
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # EINVAL: cannot sync folders; EIO: failed
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint.save_checkpoint(path, model, opt, sched, extra={"v": 2})
    assert any("may not survive a power loss" in str(w.message) for w in caught) == warns
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert_loads_as(path, model, opt, sched, {"v": 2})
