"""Files and folders the SDK creates for secrets and documents: readable by their owner only.

The modes are set explicitly, not left to the process's umask: a firm's service often runs
with the usual 022, which would leave a database of webhook secrets readable by every user
of the machine. Files and folders the SDK did not create are never changed: a mode that
lets others read one is logged as a warning, for the firm to decide.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
from pathlib import Path

__all__ = [
    "create_private_file",
    "private_directory",
    "replace_file",
    "warn_if_shared",
    "write_private_file",
]

log = logging.getLogger("cmi_sdk.files")

PRIVATE_FILE = 0o600
PRIVATE_DIRECTORY = 0o700


def private_directory(path: str | Path) -> None:
    """Create ``path`` and its missing parents with mode 0700; existing ones are left as
    they are (a working folder is usually open to others, and is the firm's to set).

    :raises OSError: a folder cannot be made, or ``path`` is there and is not a folder."""
    missing: list[Path] = []
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        try:
            os.mkdir(created, PRIVATE_DIRECTORY)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs, not to be changed
        os.chmod(created, PRIVATE_DIRECTORY)  # whatever the umask took away or left
    if not Path(path).is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(path))


def create_private_file(path: str | Path) -> bool:
    """Create ``path`` empty with mode 0600 if it is missing; True when this call made it.

    An existing file is left untouched (see :func:`warn_if_shared`)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    return True


def write_private_file(path: str | Path, data: bytes) -> None:
    """Write a new file of mode 0600 holding ``data``; never overwrites an existing one.

    :raises FileExistsError: the file is already there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        with os.fdopen(fd, "wb", closefd=False) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.close(fd)
        Path(path).unlink(missing_ok=True)
        raise
    os.close(fd)


def replace_file(path: str | Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically and durably: a reader sees the old file or the
    whole new one, never a part, and a crash leaves no half-written ``path``.

    The data goes to a temporary file beside ``path`` (its name starts with ``.`` and ends
    with ``.tmp``, so a folder listing that skips those never takes it for a document),
    which is synced, renamed over ``path``, and the folder synced. ``mode`` sets the
    file's mode (:data:`PRIVATE_FILE` for customer data); None gives the mode an ordinary
    new file gets under the process's umask.

    :raises OSError: the file cannot be written."""
    target = Path(path)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # not mkstemp's 0600
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    # A rename is durable only once its directory is; Windows cannot open a directory, and
    # makes renames durable on its own.
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def warn_if_shared(path: str | Path, what: str) -> bool:
    """Log a warning when ``path`` exists and other users may read or write it; True then."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return False
    if not mode & 0o077:
        return False
    log.warning(
        "%s %s has mode %03o: other users of this machine may read it; it was left as it"
        " is (chmod %s %s to make it private)",
        what,
        path,
        mode,
        "700" if os.path.isdir(path) else "600",
        path,
    )
    return True
