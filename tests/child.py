"""The failure of a child process as a test message: the child's own error first, then the tails of its output.

Children print progress bars and warnings; the line that says what went wrong is the last exception in stderr, so
it leads the message instead of hiding under a 4,000-character tail."""

from __future__ import annotations

import subprocess


def child_error(proc: subprocess.CompletedProcess) -> str:
    """``exit N: <the child's last error line>``, its last traceback, then the tails of stderr and stdout."""
    err = proc.stderr or ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    last = lines[-1] if lines else "(no stderr)"
    start = err.rfind("Traceback (most recent call last)")
    trace = err[start:][-3000:] if start >= 0 else ""
    return (
        f"child exited {proc.returncode}: {last}\n{trace}\n--- stderr tail ---\n{err[-1500:]}\n"
        f"--- stdout tail ---\n{(proc.stdout or '')[-1500:]}"
    )
