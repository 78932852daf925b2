"""Joining a Ray cluster, or starting a local Ray of this process's own, and refusing a cluster
that anyone on the network could run code on.

A Ray dashboard serves the Jobs API, and whoever reaches the Jobs API runs code on every node.
So a cluster whose dashboard listens beyond this machine must have Ray's token authentication on,
or the user must say that an open cluster is what they want (`--allow-open-cluster`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ray

from farm.errors import ClusterError

NAMESPACE = "sdfarm"  # every named actor of the farm (pool keeper, shared workers, file servers) lives here
LOOPBACK = ("127.", "localhost", "[::1]", "::1")
# what a local Ray's workers need from this process's environment (a joined cluster keeps its own)
FORWARDED_ENV = ("SDFARM_CACHE", "HF_HUB_OFFLINE", "HF_HOME")


def connect(address: str | None = None, gpus: int | None = None, dashboard: bool = True,
            allow_open: bool = False, local: bool = False) -> bool:
    """Join the cluster at `address` (or a running local one); else, or when `local`, start a
    local Ray of this process's own.

    A local Ray on a machine without CUDA declares one logical GPU per CPU core, so render
    actors are placed one per core exactly as they would be one per GPU. Returns True when
    this process started Ray (and so should stop it).
    """
    if ray.is_initialized():
        return False
    # Joining a cluster keeps its nodes' environment and, inside a submitted job, the job's
    # runtime env (a runtime_env here would replace it, and Ray would delete the job's working dir).
    try:  # "auto" finds a Ray running on this machine (its address file, or its processes)
        if local:
            raise ConnectionError("a Ray of this run's own was asked for")
        context = ray.init(address=address or "auto", namespace=NAMESPACE)
    except ConnectionError:
        if address:
            raise
    else:
        _leave_if_exposed(context.dashboard_url or "", allow_open)
        if _auth_mode() == "off":
            print("farm: warning: this Ray cluster runs without token authentication: anyone who reaches its "
                  "ports (GCS, raylets, dashboard) can run code on every node; start it with RAY_AUTH_MODE=token "
                  "(cluster.yaml does)", file=sys.stderr)
        return False
    _start_local(gpus, dashboard)
    return True


def _leave_if_exposed(dashboard_url: str, allow_open: bool) -> None:
    """Disconnect again (and raise) when the cluster just joined is open to the network."""
    try:
        check_exposure(dashboard_url, _auth_mode(), allow_open)
    except ClusterError:
        ray.shutdown()
        raise


def _start_local(gpus: int | None, dashboard: bool) -> None:
    """A Ray of this process's own: one (logical) GPU per CUDA device, else per CPU core."""
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() or (os.cpu_count() or 1)
    forwarded = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    context = ray.init(num_gpus=gpus, num_cpus=os.cpu_count(), namespace=NAMESPACE, include_dashboard=dashboard,
                       dashboard_host="127.0.0.1",  # loopback only: the dashboard can submit jobs
                       runtime_env={"env_vars": forwarded})
    if dashboard and context.dashboard_url:
        hint = f" ({dashboard_hint()})" if _auth_mode() == "token" else ""
        print(f"Ray dashboard: http://{context.dashboard_url}{hint}", file=sys.stderr)


def _auth_mode() -> str:
    """How this process authenticates to Ray: "token", or "off".

    Ray (2.60) has no public API for this; `ray._raylet` is the function its own dashboard and
    error messages call. Kept here, in one place, so a Ray upgrade that moves it breaks one line.
    """
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "off"


def auth_token() -> tuple[str | None, str]:
    """Ray's auth token where Ray's own CLI looks for it, and where it was found: the
    `RAY_AUTH_TOKEN` variable, the file `RAY_AUTH_TOKEN_PATH` names, else `~/.ray/auth_token`
    (which `ray start --head` writes). (None, the places looked) when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    if token:
        return token, str(path)
    return None, f"RAY_AUTH_TOKEN, {'RAY_AUTH_TOKEN_PATH=' if os.environ.get('RAY_AUTH_TOKEN_PATH') else ''}{path}"


def dashboard_hint() -> str:
    """How to get past the dashboard's "Authentication Token Required" page."""
    token, where = auth_token()
    found = f" (this machine has it in {where})" if token else ""
    return ("the dashboard asks once for Ray's auth token: `ray get-auth-token` on the head prints it"
            f"{found}; paste it there")


def check_exposure(dashboard_url: str, auth_mode: str, allow_open: bool) -> None:
    """Refuse a cluster whose dashboard (and so its Jobs API: code execution for whoever reaches
    it) listens beyond this machine with token authentication off, unless the user insists."""
    host = dashboard_url.removeprefix("http://").rsplit(":", 1)[0]
    if not host or host.startswith(LOOPBACK) or auth_mode == "token" or allow_open:
        return
    raise ClusterError(f"the cluster's dashboard listens on {host} with token authentication off: anyone who "
                       "reaches it can run code on every node; restart Ray with --dashboard-host=127.0.0.1 or "
                       "RAY_AUTH_MODE=token (see cluster.yaml), or pass --allow-open-cluster")
