"""A real multi-node Ray cluster on this box: `ray start --head` plus `ray start --address` nodes,
each with its own ports, logical GPUs and node cache, all under one RAY_TMPDIR, with token auth on
and the dashboard (Jobs API) on 127.0.0.1. Every process it starts is stopped by `stop()`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def processes_marked(mark: bytes) -> list[int]:
    """Processes (not this one) whose environment holds `mark`, e.g. b"RAY_TMPDIR=/tmp/x"."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def processes_running(*args: str) -> list[int]:
    """Processes (not this one) whose command line holds each of `args` as a whole argument, e.g. a
    submitted job's driver: ("farm.cli", "--job-key", ID); a shell wrapping it holds one long argument."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if all(arg in argv for arg in args):
                found.append(int(entry.name))
    return found


def scrape_metrics(port: int) -> str:
    """One scrape of a node's Prometheus metrics export."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def kill_marked(mark: bytes, sig=signal.SIGKILL, wait: float = 5.0) -> None:
    """Send `sig` to every process marked so and wait (up to `wait` s) until they are gone."""
    for pid in processes_marked(mark):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while processes_marked(mark) and time.monotonic() < deadline:
        time.sleep(0.2)


def raw_rows(run_root: Path) -> list[dict]:
    """Every row of every manifest part file of a run folder, as written: before `RunFolder.read()`
    folds them to one per task."""
    import pyarrow.parquet as pq

    from farm.runs.manifest import SCHEMA, RunFolder

    return [row for part in RunFolder(run_root).parts() for row in pq.read_table(part, schema=SCHEMA).to_pylist()]


def assert_exactly_once(run_root: Path, task_ids, failed_first: bool = False) -> list[dict]:
    """The raw manifest holds exactly one `ok` row for each of `task_ids` (an iterable, or a count;
    None: whichever tasks have one) and no row of any other task. `failed_first`: a task may also
    have `failed` rows (from a run that failed it before it was resumed), never a second `ok` one.
    Returns the `ok` rows."""
    rows = raw_rows(run_root)
    ok = [row for row in rows if row["status"] == "ok"]
    ids = [row["task_id"] for row in ok]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicated, f"{len(duplicated)} tasks have more than one ok row: {duplicated[:3]}"
    if isinstance(task_ids, int):
        assert len(ids) == task_ids, f"{len(ids)} ok rows, expected {task_ids}"
    elif task_ids is not None:
        assert sorted(ids) == sorted(set(task_ids)), "the ok rows are not the planned tasks"
    others = [row for row in rows if row["status"] != "ok"]
    if failed_first:
        assert {row["task_id"] for row in others} <= set(ids), "a failed row of a task that never succeeded"
    else:
        assert not others, f"{len(others)} rows are not ok: {others[0]['error']}"
    return ok


def worker_nodes(rows: list[dict]) -> set[str]:
    """The Ray node ids (first 8 hex digits) that rendered `rows`: workers are named
    `worker:gpu0@host/<node id[:8]>`."""
    return {row["worker"].rsplit("/", 1)[1] for row in rows}


class LocalCluster:
    def __init__(self, root: Path, farm_cache: Path):
        self.root = root
        self.tmp = root / "ray"  # RAY_TMPDIR: short, sockets live under it
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.gcs_port, self.dashboard_port, self.metrics_port = free_ports(3)
        self.token = secrets.token_hex(16)
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_TMPDIR": str(self.tmp),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "SDFARM_CACHE": str(farm_cache),
            "SDFARM_RUNS": str(root / "runs"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.dashboard_port}",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[dict] = []
        self.ids: dict[str, str] = {}  # node name → Ray node id, also of nodes that left

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, args: list[str], env: dict) -> None:
        done = subprocess.run([str(BIN / "ray"), "start", *args], env=env, capture_output=True, text=True,
                              timeout=120)
        if done.returncode:
            raise RuntimeError(f"ray start failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def _own_ports(self, metrics_port: int | None = None) -> list[str]:
        """Every port a raylet opens, chosen free: Ray's defaults (52365, ...) would clash with
        another Ray on this box, the tests' in-process one among them."""
        ports = free_ports(7)
        low = 20000 + 1000 * len(self.nodes)
        return [f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
                f"--runtime-env-agent-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
                f"--dashboard-agent-listen-port={ports[4]}", f"--metrics-export-port={metrics_port or ports[5]}",
                f"--min-worker-port={low}", f"--max-worker-port={low + 999}"]

    def start_head(self, gpus: int = 1, cpus: int = 2, env: dict | None = None) -> None:
        self._ray_start(["--head", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                         f"--ray-client-server-port={free_ports(1)[0]}", *self._own_ports(self.metrics_port),
                         f"--num-gpus={gpus}", f"--num-cpus={cpus}", "--disable-usage-stats"],
                        {**self.env, **(env or {})})
        self.nodes.append({"name": "head"})
        self.ids["head"] = self._node_id("head")

    def add_node(self, gpus: int = 1, cpus: int = 1, name: str | None = None, env: dict | None = None) -> dict:
        """Another raylet joining the head; its own ports, its own node cache (no shared disk).
        `env`: more environment for the node (its raylet and so its workers), e.g. SDFARM_SHARED_ROOTS."""
        name = name or f"node{len(self.nodes)}"
        cache = self.root / f"{name}-cache"
        node_env = {**self.env, **(env or {}), "SDFARM_NODE_CACHE": str(cache), "SDFARM_TEST_NODE": name}
        self._ray_start([f"--address={self.address}", "--node-ip-address=127.0.0.1", *self._own_ports(),
                         f"--num-gpus={gpus}", f"--num-cpus={cpus}", f"--resources={{\"{name}\": 1}}"], node_env)
        node = {"name": name, "cache": cache, "env": dict(env or {})}
        self.nodes.append(node)
        self.ids[name] = self._node_id(name)
        return node

    def _node_id(self, name: str) -> str:
        """The Ray node id of the node just started, from the head's state API: the head is the
        head node, any other one holds the custom resource named after it."""
        def lookup():
            request = urllib.request.Request(f"{self.dashboard}/api/v0/nodes?limit=1000",
                                             headers={"Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    nodes = json.load(answer)["data"]["result"]["result"]
            except OSError:  # the dashboard is still starting
                return None
            return next((n["node_id"] for n in nodes if n["state"] == "ALIVE" and (
                n["is_head_node"] if name == "head" else name in n.get("resources_total", {}))), None)

        return self.wait_for(lookup, timeout=60, what=f"node {name} in the state API")

    def node_id(self, name: str) -> str:
        """First 8 hex digits of a node's Ray id (also after it left), as worker names and
        checkpoints carry it."""
        return self.ids[name][:8]

    def remove_node(self, name: str) -> None:
        """The node's machine is gone: kill -9 every process of it (raylet, workers, agents)."""
        self._kill(f"SDFARM_TEST_NODE={name}".encode(), signal.SIGKILL)
        self.nodes = [node for node in self.nodes if node["name"] != name]

    def farm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "farm.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def wait_for(self, predicate, timeout: float = 120, every: float = 0.5, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(every)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

    def processes(self, mark: bytes | None = None) -> list[int]:
        """Every process of this cluster: they all carry its RAY_TMPDIR in their environment
        (`ray stop` would stop every Ray on the box, the tests' own among them)."""
        return processes_marked(mark or f"RAY_TMPDIR={self.tmp}".encode())

    def _kill(self, mark: bytes, sig, wait: float = 5.0) -> None:
        kill_marked(mark, sig, wait)

    def stop(self) -> None:
        mark = f"RAY_TMPDIR={self.tmp}".encode()
        self._kill(mark, signal.SIGTERM, 8.0)
        self._kill(mark, signal.SIGKILL)


@contextmanager
def local_cluster(farm_cache: Path, prefix: str):
    """A LocalCluster in a temp folder of its own, stopped and removed afterwards; nothing it
    started may outlive it. The folder is short: Ray's socket paths must fit 107 bytes."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    cluster = LocalCluster(root, farm_cache)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not cluster.processes(), "a process of the test cluster outlived it"
