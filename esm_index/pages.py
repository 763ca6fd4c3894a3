"""Keeping a long pass over an LMDB store from piling up the store's pages in the process's RSS.

LMDB reads through one shared, read-only memory map of its file. Every page a pass over the
pool touches stays mapped, and counted in the process's resident set, until the kernel is
short of memory: 296 kB a float16 map, 30 GB for a pass over 100k sources, on a machine
other jobs share. ``drop_read_pages`` lets go of this process's mapping of the file
(madvise MADV_DONTNEED), which loses nothing: the pages stay in the page cache, and the next
read maps them again. store.py calls it after each batch of its full passes.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

MADV_DONTNEED = 4  # Linux


def drop_read_pages(data_file: Path) -> None:
    """Let go of this process's mapping of ``data_file`` (see the module docstring). Linux
    only (a no-op elsewhere), and only for read-only shared maps (LMDB's, unless it was
    opened with MDB_WRITEMAP)."""
    if not sys.platform.startswith("linux"):
        return
    target = str(data_file)
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            spans = [line.split(maxsplit=5) for line in maps if line.rstrip("\n").endswith(target)]
    except OSError:
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    for span in spans:
        if len(span) == 6 and span[5].rstrip("\n") == target and "w" not in span[1] and "s" in span[1]:
            start, end = (int(v, 16) for v in span[0].split("-"))
            madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)
