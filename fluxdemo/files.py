"""Files we create get the permissions the user's umask gives (like open() and shell redirection do).

tempfile.mkstemp, which atomic writes need, creates its file 0600 whatever the umask; our outputs (PNGs, uploaded
LoRAs) are ordinary files that other users and the web server may be meant to read.
"""

from __future__ import annotations

import os


def new_file_mode() -> int:
    """The mode open() gives a new file under this process's umask: 0o644 under umask 022."""
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask can only be read by setting it, racing other threads)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask
