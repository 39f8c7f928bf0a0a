"""Faults for tests: a full disk, simulated by a file-size limit on a child process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FULL_DISK_CLI = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from lightning_sae.cli import main
main(sys.argv[2:])
"""


def run_cli_on_a_full_disk(args: list[str], max_file_bytes: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``lightning_sae <args>`` in a child process that cannot write any file beyond ``max_file_bytes``
    (what a full disk looks like to a writer)."""
    return subprocess.run(
        [sys.executable, "-c", FULL_DISK_CLI, str(max_file_bytes), *args],
        capture_output=True, text=True, timeout=300, cwd=cwd, check=False,
    )
