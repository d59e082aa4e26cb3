"""`make setup` (what `make demo` needs first) runs with Python and the data alone: no kubectl,
no Prometheus, no root. Run with a PATH from which those are removed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from fieldlens.common.settings import REPO_ROOT

DEPLOY_ONLY = ("kubectl", "prometheus", "promtool", "apt-get", "sudo")


def _trimmed_path(tmp_path: Path) -> str:
    """A PATH of one folder linking every program on this PATH but the deployment tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder or not Path(folder).is_dir():
            continue
        for program in Path(folder).iterdir():
            target = bin_dir / program.name
            if program.name in DEPLOY_ONLY or target.exists() or not os.access(program, os.X_OK):
                continue
            target.symlink_to(program)
    return str(bin_dir)


def test_setup_needs_no_deployment_tools(tmp_path):
    path = _trimmed_path(tmp_path)
    assert all(shutil.which(tool, path=path) is None for tool in DEPLOY_ONLY)
    env = {**os.environ, "PATH": path}
    plan = subprocess.run(
        ["make", "-n", "demo"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert "apt-get" not in plan.stdout and "kubectl" not in plan.stdout
    done = subprocess.run(
        ["make", "setup"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # While the targets that do use them still say what is missing.
    missing = subprocess.run(
        ["make", "deploy-tools"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert missing.returncode != 0
