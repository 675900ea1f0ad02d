"""Files written whole or not at all, and failures to write or read them turned into one clear line.

Every file fmnist-dist writes goes through `atomic_write`: a crash at any moment leaves the old file or the
new one, never a part of one.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from fmnist_dist.errors import UsageError, first_line


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write `path` so that a crash at any moment leaves either its old contents or its new ones.

    `write` fills a hidden temporary file in the same directory, which is flushed to disk and then renamed over
    `path` (a rename within one file system is atomic). The new file gets the old one's permissions, or, for a
    new file, those a plain `open` would give it.

    Raises:
        UsageError: the file system refused (a full disk, no permission); the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    with reporting_write_errors(path, f"the previous {path.name}, if any, is unchanged", "run again"):
        # os.open applies the umask as open() does (tempfile.mkstemp would make the file private to its owner).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                if path.exists():
                    os.chmod(f.fileno(), stat.S_IMODE(path.stat().st_mode))
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    _fsync_directory(path.parent)  # make the rename itself survive a power loss


@contextmanager
def reporting_write_errors(path: Path, kept: str, then: str) -> Iterator[None]:
    """Turn a failure to write `path` (a file or a directory) into a UsageError naming it, the cause, what is
    `kept`, the remedy for that cause and what to do `then` ("could not write P: no space left on device; K;
    free some space, then T").

    Only failures of the file system are turned: an OSError anywhere in the exception's chain, or any error
    while the file system is full (writers such as torch.save and safetensors report a full disk in their
    own words, "unexpected pos 1280 vs 1174"). Any other error (a bug) passes through unchanged.
    """
    try:
        yield
    except Exception as error:
        found = write_failure(error, Path(path))
        if found is None:
            raise
        code, cause = found
        raise UsageError(f"could not write {path}: {cause}; {kept}; {_remedy(code)}, then {then}") from error


def write_failure(error: BaseException, path: Path) -> tuple[int | None, str] | None:
    """Why writing `path` failed: the errno (None when unknown) and the system's words for it ("no space left on
    device"); None for a bug."""
    chain = _exception_chain(error)
    for link in chain:
        if isinstance(link, OSError):
            return link.errno, (link.strerror or first_line(link)).lower()
    text = " ".join(str(link) for link in chain)
    for code in (errno.ENOSPC, errno.EDQUOT):
        if os.strerror(code) in text:
            return code, os.strerror(code).lower()
    if _free_bytes(path) == 0:
        return errno.ENOSPC, os.strerror(errno.ENOSPC).lower()
    return None


def _remedy(code: int | None) -> str:
    """What lets a write that failed with `code` succeed (advice by cause: space is no cure for permissions)."""
    if code == errno.ENOSPC:
        return "free some space"
    if code == errno.EDQUOT:
        return "free some space or raise your disk quota"
    if code in (errno.EACCES, errno.EPERM):
        return "make it writable for this user (its permissions, or an immutable attribute: chattr -i)"
    if code == errno.EROFS:
        return "remount the file system read-write, or write elsewhere"
    return "fix the file system"


def umask_file_mode() -> int:
    """The mode the umask gives a new file (as `open` makes it: 0o666 less the umask).

    Read from /proc where Linux shows it, since setting the umask to read it would change it for every thread
    for a moment.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _exception_chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    return chain


def _free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer can still use on the file system of `path` (or of its nearest parent)."""
    for candidate in (path, *path.parents):
        try:
            stats = os.statvfs(candidate)
        except OSError:
            continue
        return stats.f_bavail * stats.f_frsize
    return None


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform or file system that cannot open directories: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a file ("does not exist", "is a directory", ...), or None for a regular file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as error:
        return f"cannot be read ({(error.strerror or first_line(error)).lower()})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a FIFO, socket or device)"
    return None
