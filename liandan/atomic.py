"""Atomic writes: a reader (or a crash) never sees a half-written file or directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from liandan.errors import LiandanError


@contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path next to `target`; rename it over `target` on success.

    Used for single files (safetensors, JSON). The rename is atomic on POSIX because the
    temporary file lives in the same directory.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600, and writers that replace the file (safetensors' save_file) do too: give it the
        # permissions open() would, so a shared model folder or another user can read it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_dir(target: str | os.PathLike, keep_others=False):
    """Yield a temporary directory; on success it replaces `target` as a whole.

    An existing `target` is moved aside first and removed only after the new one is in
    place, so at every moment either the old or the new complete directory exists. With
    `keep_others` (True, or a test of an entry's name), entries of the old directory that the new
    one does not have (files the user kept there) are moved into the new one instead of being removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for path in tmp.rglob("*"):  # safetensors' save_file (in save_pretrained) writes 0600 files
            if path.is_file() and not path.is_symlink():
                os.chmod(path, 0o666 & ~_umask())
        old = None
        if target.exists():
            # A fresh name: a fixed one could hold what an earlier interrupted swap left behind.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            if keep_others:
                _carry_over(old, target, keep_others if callable(keep_others) else lambda name: True)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _carry_over(old: Path, new: Path, keep) -> None:
    for entry in old.iterdir():
        if keep(entry.name) and not os.path.lexists(new / entry.name):
            try:
                os.replace(entry, new / entry.name)
            except OSError as exc:
                raise LiandanError(f"{new} was replaced, but moving your file {entry.name} back failed "
                                   f"({exc.strerror}); it and the previous output are in {old}") from None


def check_creatable(target: Path, flag: str) -> None:
    """Before any work: the folders on the way to `target` are folders (or can be made) in one that takes writes.
    An existing folder is written into, so it is the one that must take writes (export ollama --out .)."""
    folder = Path(os.path.abspath(target))
    if not folder.is_dir():
        folder = folder.parent
        while not os.path.lexists(folder):
            folder = folder.parent
    if not folder.is_dir():
        raise LiandanError(f"{flag} {target}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LiandanError(f"{flag} {target}: cannot write in {folder} (permission denied)")


def check_output(target: str | os.PathLike, flag: str, reads, overwrite: bool, directory: bool = False) -> None:
    """Refuse an output path that would replace what the command reads or what the user keeps.

    `reads` maps labels ("--adapter-path") to paths the command reads (a dict or (label, path) pairs). The target may not be
    one of them or contain one; a directory target may not lie inside one either, and a file target
    may be created inside one but not replace a file there. Without `overwrite`, an existing file or
    non-empty directory is refused.
    """
    target = Path(target)
    check_creatable(target, flag)
    real = Path(os.path.realpath(target))
    for label, source in reads.items() if isinstance(reads, dict) else reads:
        if source is None or not os.path.lexists(source):
            continue
        src = Path(os.path.realpath(source))
        how = ("is" if real == src else "contains" if real in src.parents
               else "is inside" if src in real.parents and (directory or os.path.lexists(target)) else None)
        if how:
            raise LiandanError(f"{flag} {target} {how} {label} {source}, which this command reads; "
                               "choose another path (it is never replaced, not even with --overwrite)")
    if not os.path.lexists(target):
        return
    if target.is_dir() != directory:
        kind = "a directory" if target.is_dir() else "a file"
        raise LiandanError(f"{flag} {target} is {kind}; expected a {'directory' if directory else 'file'} path")
    if overwrite or (directory and not any(target.iterdir())):
        return
    holds = ", ".join(sorted(p.name for p in target.iterdir())[:5]) if directory else None
    raise LiandanError(f"{flag} {target} already exists" + (f" and holds {holds}" if holds else "")
                       + "; pass --overwrite to replace it" + (" (other files there are kept)" if directory else "")
                       + ", or choose another path")


@contextmanager
def removed_if_failed(directory: str | os.PathLike):
    """Remove the directories a failed run created on the way to `directory`, if they are still empty.

    Only directories that did not exist before and hold no file are removed (os.rmdir refuses the
    others), so checkpoints a failed run did save, and anything the user put there, stay. A directory holding
    only empty files goes too: a log opened before the failure (metrics.jsonl) with nothing in it.
    """
    directory = Path(os.path.abspath(directory))
    created = directory
    while not created.parent.exists() and created.parent != created:
        created = created.parent
    existed = created.exists()
    try:
        yield
    except BaseException:
        if not existed and created.is_dir():
            for root, _, files in sorted(os.walk(created), key=lambda walked: -len(walked[0])):
                try:
                    paths = [Path(root) / name for name in files]
                    if all(os.path.getsize(path) == 0 for path in paths):  # else it holds what the run saved
                        for path in paths:
                            os.unlink(path)
                    os.rmdir(root)
                except OSError:
                    pass
        raise
