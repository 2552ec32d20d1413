"""Writing files so that they cannot be half there: the one helper every metabench write goes through.

:func:`write_atomic` writes to a hidden temporary file in the target's folder
(``.<name>.<pid>-<random>.tmp``), flushes and fsyncs it, then renames it over the target (or, with
``exclusive=True``, links it to the first free name, never replacing a file) and fsyncs the folder.
A reader finds the previous file or the new one, never part of one. When the write fails (a full
disk, a read-only folder, no permission) the temporary file is removed, the previous file is left
as it was, and the error is a :class:`~metabench.errors.MetabenchError` of one line naming the
path: ``cannot write <path>: No space left on device``.

Result files, learner files, checkpoints, evaluation-progress files, data caches, published
results, leaderboard pages, the plugin index, ``metabench plot``'s images and the sweep's
finished-cell markers are written through it (the training-curve logger appends line by line
instead, and renames its file when the run ends). It imports no torch.
"""
from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Callable

from .errors import MetabenchError

_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


class _Sink:
    """The temporary file as handed to a writer: remembers an OSError from ``write`` (torch.save
    turns one into a RuntimeError whose text does not say what happened)."""

    def __init__(self, fh, path: Path):
        self._fh = fh
        self.path = path  # the file it becomes
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._fh.flush()


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def cannot_write(path: Path, exc: OSError) -> MetabenchError:
    """The one-line error of a failed write."""
    return MetabenchError(f"cannot write {path}: {_reason(exc)}")


def numbered(path: Path, n: int, suffix: str | None = None) -> Path:
    """``path`` for n = 1, else the name with ``-n`` before ``suffix`` (default: the last suffix):
    ``x.json`` -> ``x-2.json``; with suffix ``.learner.pt``: ``x.learner.pt`` -> ``x-2.learner.pt``."""
    if n == 1:
        return path
    suffix = path.suffix if suffix is None else suffix
    name = path.name
    stem = name[:-len(suffix)] if suffix and name.endswith(suffix) else name
    return path.with_name(f"{stem}-{n}{suffix if name.endswith(suffix) else ''}")


def write_atomic(path: str | Path, write: Callable[[object], object], *, exclusive: bool = False,
                 suffix: str | None = None, before_rename: Callable[[], None] | None = None) -> Path:
    """Write a file all at once: ``write(fh)`` fills a temporary file, which then takes ``path``'s name.

    ``fh`` is a binary file object with ``write`` and ``flush``. With ``exclusive`` an existing file
    is never replaced: the file gets the first free name of ``path``, ``path-2``, ``path-3``, ...
    (the number before ``suffix``, see :func:`numbered`), claimed atomically, so two processes
    writing the same name at once both keep their file. ``before_rename()`` runs between the
    fsync and the rename (tests inject a crash there). Returns the path written.

    Any OSError (creating the folder or the file, writing, fsync, renaming) removes the temporary
    file and raises MetabenchError ``cannot write <path>: <reason>``; the previous file is intact.
    Other exceptions (a writer's own error, KeyboardInterrupt) also remove it and propagate.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    sink = None
    created = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        created = True
        with os.fdopen(fd, "wb") as fh:
            sink = _Sink(fh, path)
            write(sink)
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename()
        target = _claim(tmp, path, suffix) if exclusive else path
        if not exclusive:
            os.replace(tmp, target)
    except OSError as exc:
        _remove(tmp, created)
        raise cannot_write(path, exc) from None
    except BaseException as exc:
        _remove(tmp, created)
        if sink is not None and sink.error is not None and not isinstance(exc, KeyboardInterrupt):
            raise cannot_write(path, sink.error) from None
        raise
    fsync_folder(path.parent)
    return target


def _claim(tmp: Path, path: Path, suffix: str | None) -> Path:
    """Give ``tmp`` the first free name of ``path``, ``path-2``, ... without replacing any file."""
    n = 1
    while True:
        target = numbered(path, n, suffix)
        try:
            os.link(tmp, target)  # atomic, and fails instead of replacing a file
        except FileExistsError:
            n += 1
            continue
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            try:  # a file system without hard links: reserve the name (O_EXCL), then rename onto it
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                n += 1
                continue
            os.replace(tmp, target)
            return target
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return target


def _remove(tmp: Path, created: bool) -> None:
    if created:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def write_bytes_atomic(path: str | Path, data: bytes, **options) -> Path:
    """:func:`write_atomic` of ``data``."""
    return write_atomic(path, lambda fh: fh.write(data), **options)
