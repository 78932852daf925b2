"""`ray up cluster.yaml` / `ray down` for real: the project's cluster.yaml, pointed at an sshd this
test starts on 127.0.0.1:22 (and stops), with a non-root ssh user, as on the two laptops.

What the test changes in cluster.yaml, and why: the head's address (127.0.0.1) and no worker (the
local provider tells nodes apart by IP, so one box can be only one node), the test's ssh user and
key, free ports and a private RAY_TMPDIR in the start commands (another Ray runs on this box), and
setup commands that put a ready Python with Ray on the user's PATH instead of installing the
project (minutes of downloads). Provider, auth, file mounts (rsync), the token file and the start
commands' flags are the file's own. Where this machine cannot run it (not root, no sshd or rsync,
port 22 taken), the test is skipped and says why.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from local_cluster import free_ports

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
USER = "sdfarmci"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start sshd on port 22 and add a test user"
    for tool in ("/usr/sbin/sshd", shutil.which("rsync"), shutil.which("ssh"), shutil.which("useradd")):
        if not tool or not Path(tool).exists():
            return f"needs sshd, ssh, rsync and useradd (apt-get install openssh-server rsync); missing {tool}"
    if not Path("/usr/bin/python3.11").exists():
        return "needs a system Python 3.11 the ssh user can run (/usr/bin/python3.11)"
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 22)) == 0:
            return "port 22 on 127.0.0.1 is taken (the local provider always uses port 22)"
    return None


def run(*command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=kwargs.pop("timeout", 120), **kwargs)


@pytest.fixture
def ssh_user():
    """A non-root user with a venv that sees this project's packages, on PATH in login shells."""
    created = run("id", USER).returncode != 0
    if created:
        assert run("useradd", "-m", "-s", "/bin/bash", USER).returncode == 0
        run("usermod", "-p", "*", USER)  # unlocked, yet no password login
    home = Path(pwd.getpwnam(USER).pw_dir)
    venv = home / "venv"
    run("/usr/bin/python3.11", "-m", "venv", "--without-pip", str(venv))
    site = venv / "lib" / "python3.11" / "site-packages"
    packages = next(Path(sys.prefix).glob("lib/python3.11/site-packages"))
    (site / "sdfarm-host.pth").write_text(f"{packages}\n{ROOT}\n")
    (venv / "bin" / "ray").write_text(f"#!{venv}/bin/python\nimport sys\n"
                                      "from ray.scripts.scripts import main\nsys.exit(main())\n")
    (venv / "bin" / "ray").chmod(0o755)
    (home / ".profile").write_text(f"export PATH={venv}/bin:$PATH\n")
    run("chown", "-R", f"{USER}:{USER}", str(home))
    yield home
    run("pkill", "-9", "-u", USER)
    if created:
        run("userdel", "-r", USER)


@pytest.fixture
def sshd():
    folder = Path(tempfile.mkdtemp(prefix="sdfarm-sshd-"))
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key"))
    config = folder / "sshd_config"
    config.write_text(f"Port 22\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
                      f"PidFile {folder / 'sshd.pid'}\n"
                      "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin no\n"
                      f"AllowUsers {USER}\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    server = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                              stderr=open(folder / "sshd.log", "w"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", 22)) == 0:
                break
        time.sleep(0.1)
    yield folder
    server.terminate()
    server.wait(10)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def launcher_possible():
    reason = _why_not()
    if reason:
        pytest.skip(f"ray up test skipped: {reason}")


def test_ray_up_and_down_for_real(launcher_possible, ssh_user, sshd):
    work = Path(tempfile.mkdtemp(prefix="sdfarm-up-"))
    work.chmod(0o755)
    key = work / "id_ed25519"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
    ssh_dir = ssh_user / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text((work / "id_ed25519.pub").read_text())
    token = work / "auth_token"
    token.write_text("sdfarm-test-token-" + os.urandom(8).hex())
    run("chown", "-R", f"{USER}:{USER}", str(ssh_dir))

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    gcs, dashboard, client = free_ports(3)
    raytmp = work / "raytmp"
    ports = (f"--port={gcs} --dashboard-port={dashboard} --ray-client-server-port={client} "
             + " ".join(f"--{name}={port}" for name, port in zip(
                 ["node-manager-port", "object-manager-port", "runtime-env-agent-port", "dashboard-agent-grpc-port",
                  "dashboard-agent-listen-port", "metrics-export-port"], free_ports(6)))
             + " --min-worker-port=31000 --max-worker-port=31999")
    head_start = [c for c in config["head_start_ray_commands"] if " start " in c][0]
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": USER, "ssh_private_key": str(key)}
    config.update(min_workers=0, max_workers=0)
    mounts = work / "project"
    (mounts / "jobs").mkdir(parents=True)
    shutil.copy(ROOT / "jobs" / "demo.yaml", mounts / "jobs")
    config["file_mounts"] = {"~/sdfarm": str(mounts), "~/.ray/auth_token": str(token)}
    config["setup_commands"] = ["ray --version"]  # the user's PATH has Ray (see ssh_user)
    start = head_start.replace("~/sdfarm/.venv/bin/ray", "ray").replace("--port=6379", "").replace(
        "--metrics-export-port=8080", "")  # free ports instead, below
    config["head_start_ray_commands"] = ["ray stop", f"RAY_TMPDIR={raytmp} {start} {ports}"]
    config["worker_start_ray_commands"] = []
    path = work / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    raytmp.mkdir()
    run("chown", "-R", f"{USER}:{USER}", str(raytmp))

    env = {**os.environ, "RAY_TMPDIR": str(work / "launcher-tmp"), "HOME": str(work)}
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).parent / "ray")
    try:
        up = run(ray, "up", "-y", "--no-config-cache", str(path), env=env, timeout=300)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        # the dashboard (Jobs API) answers on loopback and asks for the token
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/jobs/", timeout=10)
        assert refused.value.code in (401, 403)
        request = urllib.request.Request(f"http://127.0.0.1:{dashboard}/api/jobs/",
                                         headers={"Authorization": f"Bearer {token.read_text()}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
        assert (ssh_user / "sdfarm" / "jobs" / "demo.yaml").is_file(), "file_mounts were not synced"
        raylets = run("pgrep", "-u", USER, "-f", "raylet").stdout.split()
        assert raylets, "no raylet runs as the ssh user"
    finally:
        down = run(ray, "down", "-y", str(path), env=env, timeout=300)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    time.sleep(2)
    assert not run("pgrep", "-u", USER, "-f", "raylet|gcs_server").stdout.split(), "ray down left Ray running"
    shutil.rmtree(work, ignore_errors=True)
