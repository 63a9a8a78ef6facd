"""Which shared-memory files live processes hold (tests/conftest.py removes only the others)."""

import os


def held_open(directory: str) -> set[str]:
    """Names in `directory` that a live process holds open: a rank of a run still going, such as one that another
    test process on this machine started (a second pytest beside CI's removed a starting run's buffers, and both
    of its ranks waited forever for each other's)."""
    held = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{pid}/fd"):
                target = os.readlink(fd.path)
                if os.path.dirname(target) == directory:
                    held.add(os.path.basename(target))
        except OSError:  # the process exited, or is not ours to look into
            continue
    return held
