"""Reading the base's first weights into the page cache while the build's interpreter imports torch.

Importing torch takes seconds (3.6 s on the lent H200 machine, 2.8 s here) before the merge reads its first byte;
on a cold cache the disk would sit idle meanwhile. The kernel is asked to read ahead (posix_fadvise WILLNEED,
asynchronous) the first weight files in the order the merge reads them, up to a budget the page cache can hold,
so the merge finds them there. Best effort and read-only: where the call or the files are missing, nothing
happens and the plan reports what is wrong. No torch here: this module is imported before it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

# At most this much is read ahead: what the disk reads in a few seconds of imports, not the model.
PREFETCH_LIMIT = 4 << 30


def base_weight_files(base: Path) -> list[Path]:
    """The base's weight files in the order of its index (the order the merge reads them), else by name."""
    index = base / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [base / name for name in dict.fromkeys(weight_map.values()) if isinstance(name, str)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []  # the plan says what is wrong with the index
    return sorted(base.glob("*.safetensors"))


def prefetch_budget() -> int:
    """PREFETCH_LIMIT, or a quarter of the memory available now if less (0 where the system does not say)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0
    return min(PREFETCH_LIMIT, available // 4)


def read_ahead(files: list[Path], budget: int) -> int:
    """Ask the kernel to read the first `budget` bytes of files, in order; returns the bytes asked for."""
    asked = 0
    for path in files:
        if asked >= budget:
            break
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            length = min(os.fstat(fd).st_size, budget - asked)
            os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
            asked += length
        except OSError:
            pass
        finally:
            os.close(fd)
    return asked


def start_prefetch(base: Path) -> threading.Thread | None:
    """Read ahead the base's first weight files in a background thread (None where nothing can be read ahead)."""
    budget = prefetch_budget()
    if budget == 0 or not hasattr(os, "posix_fadvise"):
        return None
    thread = threading.Thread(target=read_ahead, args=(base_weight_files(base), budget), name="modelpack-prefetch",
                              daemon=True)
    thread.start()
    return thread
