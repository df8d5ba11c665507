"""A watch on a FIFO and a file: sees whether anything opens either while it is active.

Shared by the attacks that must open nothing (a DOCTYPE, a detached signature's reference):
the FIFO is polled from its writing end by a separate process, and inotify reports any open
of the existing file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Watch"]

_IN_OPEN = 0x20
_IN_ACCESS = 0x01


# Runs in its own process: a parser that opens the FIFO blocks in open(2) holding the GIL,
# so no thread of the test's own process could see it, nor release it.
_WATCHER = """
import errno, os, select, sys, time
fifo = sys.argv[1]
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0.002)[0]:
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
    else:
        print("opened", flush=True)
        os.close(fd)
"""


@dataclass
class Watch:
    """Sees whether anything opens ``fifo`` or ``existing`` while it is active.

    The FIFO is polled from its writing end, by a separate process: opening it without
    blocking succeeds only while someone holds the reading end open, that is, someone
    opened the FIFO; closing it again gives that reader an end of file, so it is released
    rather than left blocked. inotify reports any open of the existing file.
    """

    fifo: Path
    existing: Path
    opened: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def active(self) -> Iterator[Watch]:
        libc = ctypes.CDLL(None, use_errno=True)
        notify = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert notify >= 0, os.strerror(ctypes.get_errno())
        assert libc.inotify_add_watch(notify, bytes(self.existing), _IN_OPEN | _IN_ACCESS) >= 0
        watcher = subprocess.Popen(
            [sys.executable, "-c", _WATCHER, str(self.fifo)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert watcher.stdout is not None
            assert watcher.stdout.readline().strip() == "ready"
            yield self
        finally:
            out, _ = watcher.communicate("stop\n", timeout=20)
            self.opened += [str(self.fifo)] * out.split().count("opened")
            with contextlib.suppress(BlockingIOError):
                events = os.read(notify, 65536)
                while events:
                    _wd, mask, _cookie, size = struct.unpack_from("iIII", events)
                    if mask & (_IN_OPEN | _IN_ACCESS):
                        self.opened.append(str(self.existing))
                    events = events[16 + size :]
            os.close(notify)
