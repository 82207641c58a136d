"""Finding and killing this test session's Ray worker processes (never raylet, GCS or agents).

The session's local Ray is started by this process, so its raylet is a child of it and
every worker process (tasks and actors) a child of that raylet. Ray names worker
processes ``ray::<task or actor>`` (``ray::IDLE`` between tasks); its agents are
``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` and are left alone.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process readable now."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        found[int(entry.name)] = (ppid, cmdline)
    return found


def session_workers() -> dict[int, str]:
    """pid -> process title of the Ray worker processes of the Ray this process started."""
    procs = _processes()
    raylets = {pid for pid, (ppid, cmd) in procs.items() if ppid == os.getpid() and "raylet" in cmd}
    return {pid: cmd.split()[0] for pid, (ppid, cmd) in procs.items()
            if ppid in raylets and cmd.startswith("ray::") and not cmd.startswith(AGENTS)}  # fmt: skip


def kill(pid: int) -> bool:
    """SIGKILL ``pid``; whether it was still there."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True
