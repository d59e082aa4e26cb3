"""Fresh Python processes for unit tests of how a process starts: a real tiny-classifier
service, or a snippet of code."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SERVICE_START_TIMEOUT_S = 60.0
SNIPPET_TIMEOUT_S = 120


def python_json(code: str, env: dict[str, str]) -> Any:
    """Runs `python -c code` with `env` and returns the JSON its last output line holds
    (failing, with its stderr, if it exits non-zero)."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=SNIPPET_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


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
