"""Small helpers shared by the benchmark scripts (importable because scripts/ is on sys.path
when a script runs as ``python scripts/<name>.py``)."""

from __future__ import annotations

import platform
import socket
import subprocess


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a local rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    """The CPU model name (lscpu), for the record printed next to the figures."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
