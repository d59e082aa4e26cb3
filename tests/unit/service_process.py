"""A real tiny-classifier service process for unit tests of how a service starts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

SERVICE_START_TIMEOUT_S = 60.0


def tiny_log_until(tmp_path: Path, env: dict[str, str], marker: str) -> tuple[str, int | None]:
    """Starts `python -m fieldlens.tiny` with `env` (plus a free port, no metrics, a state
    dir under `tmp_path`), waits until its log shows `marker` (failing if it exits first),
    stops it with SIGTERM; returns its log and exit code."""
    env = {
        **env,
        "FIELDLENS_LISTEN_ADDR": "127.0.0.1:0",
        "FIELDLENS_METRICS_PORT": "0",
        "FIELDLENS_STATE_DIR": str(tmp_path / "state"),
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "tiny.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fieldlens.tiny"], env=env, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
        text = ""
        while time.monotonic() < deadline and marker not in text:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
            text = log_path.read_text()
        assert marker in text, text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return text, proc.returncode
