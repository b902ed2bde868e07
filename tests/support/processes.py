"""Child processes of the test peers (node OP, PouchDB): stopping them cleanly."""

from __future__ import annotations

import subprocess
from typing import IO


def stop_peer(process: subprocess.Popen[bytes] | None, log: IO[bytes] | None) -> None:
    """Stop a test peer started with piped stdin/stdout (node OP, PouchDB): TERM, then KILL
    after 5 s, and close its pipes and log file."""
    if process is not None:
        if process.stdin is not None:
            process.stdin.close()
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    if log is not None:
        log.close()
