"""scripts/up, run as a newcomer runs it (against its own config so it cannot
disturb a real installation), ends with a running `demo` agent."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import REPO

pytestmark = pytest.mark.root


def test_scripts_up_brings_up_demo(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory("up", start=False)
    d.created.append("demo")
    key = tmp_path / "newcomer"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pidfile = tmp_path / "daemon.pid"
    env = dict(os.environ, CORRAL_CONFIG=d.config_path, CORRAL_SOCKET=d.socket,
               CORRAL_PIDFILE=str(pidfile), CORRAL_LOG=d.log_path, CORRAL_UP_KEY=f"{key}.pub",
               CORRAL_SSH_PORT=str(d.ssh_port))
    try:
        cp = subprocess.run([str(REPO / "scripts" / "up")], env=env, capture_output=True,
                            text=True, timeout=600)
        assert cp.returncode == 0, cp.stdout + cp.stderr + d.log()
        assert f"ssh -p {d.ssh_port} demo@localhost" in cp.stdout
        assert "corral attach demo" in cp.stdout
        info = d.wait_state("demo", ("running",))
        assert info["workspace"]["project"] == str(REPO / "examples" / "demo-project")
        # the newcomer's key owns the demo agent and gets in over SSH
        r = subprocess.run(["ssh", "-p", str(d.ssh_port), "-F", "/dev/null", "-o",
                            "StrictHostKeyChecking=no", "-o",
                            f"UserKnownHostsFile={tmp_path}/kh", "-o", "IdentitiesOnly=yes",
                            "-o", "BatchMode=yes", "-i", str(key), "demo@127.0.0.1",
                            "cat /workspace/hello.py | head -1"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "demo agent" in r.stdout
        # running it again is harmless
        cp = subprocess.run([str(REPO / "scripts" / "up")], env=env, capture_output=True,
                            text=True, timeout=600)
        assert cp.returncode == 0, cp.stdout + cp.stderr
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text())
            d.cli("rm", "--force", "demo")
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                subprocess.run(["sleep", "0.1"], check=False)
