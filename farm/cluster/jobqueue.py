"""The job queue on Ray Jobs: submit a spec to the head, list, watch, pause, cancel, resume.

A submitted job is an ordinary Ray job (the dashboard's Jobs tab shows it and its logs) whose
entrypoint is `farm run` on the head, with the spec's folder as its working directory and its run
folder on the head. The job's spec and manifest are its whole state: resuming resubmits the same
entrypoint and renders only what has no `ok` row. Pausing and the pool's status reach the pool's
keeper through a short control job, so every command works wherever the Jobs API is reachable
(`ray dashboard cluster.yaml` forwards it), with Ray's token sent by the SDK.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from farm.errors import ClusterError, first_line

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PROGRESS_MARK = "sdfarm-progress "
TAIL_LINES = (200, 5000)  # how much of a driver log's end `farm jobs` reads for its latest progress
_MAX_UPLOAD_FILE = 50 << 20  # a spec folder file above this is not sent along (say, a stray checkpoint)


# A job's driver must run on the head's farm install whatever PATH Ray was started with (`python`
# there may be another Python, or none). The entrypoint's shell is a child of Ray's job supervisor,
# a Python process of the Ray install on the head; the interpreter of the environment whose
# `ray/_raylet.so` it loaded (read from /proc/<ppid>/maps) is that install's, where the farm lives
# beside Ray. Without /proc (or in an odd layout) it falls back to `python` on PATH.
_HEAD_PYTHON = ('py=$(grep -m1 -o "/[^ ]*/site-packages/ray/_raylet.so" /proc/$PPID/maps 2>/dev/null); '
                'py=${py%/lib/python*}; if [ -n "$py" ] && [ -x "$py/bin/python" ]; then py=$py/bin/python; '
                'else py=python; fi; exec "$py" -m farm.cli')


def entrypoint(args: list[str]) -> str:
    """The shell command that runs `farm ARGS` on the head with the head's farm install."""
    return f"{_HEAD_PYTHON} {shlex.join(args)}"


def print_progress(progress: dict) -> None:
    """A line in the driver's log (the dashboard's Jobs tab): `farm jobs` reads the latest."""
    print(PROGRESS_MARK + json.dumps(progress), flush=True)


def api_address(address: str | None) -> str:
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


def client(address: str | None):
    """A Jobs API client for `address` ($RAY_API_SERVER_ADDRESS, else the local dashboard) that
    sends Ray's auth token whenever one is found: a head started plainly (`ray start --head`)
    requires it, and Ray's SDK sends it only when RAY_AUTH_MODE=token is exported."""
    from ray.job_submission import JobSubmissionClient

    address = api_address(address)
    headers, where = _auth_headers()
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # connection refused, auth failure, not a Ray dashboard
        text = " ".join(str(exc).split())
        if "Authentication required" in text:
            raise ClusterError(f"--address {address}: the cluster wants Ray's auth token and none was found "
                               f"(looked in {where}); on the head `ray get-auth-token` prints it: put it in "
                               "~/.ray/auth_token or export RAY_AUTH_TOKEN") from None
        if "Authentication failed" in text:
            raise ClusterError(f"--address {address}: the cluster refused the auth token from {where} (another "
                               "cluster's?); on the head `ray get-auth-token` prints the right one") from None
        raise ClusterError(f"--address {address}: no Ray Jobs API there ({first_line(exc)}); start the cluster "
                           "(`ray up cluster.yaml`) and forward it (`ray dashboard cluster.yaml`)") from None


def _auth_headers() -> tuple[dict | None, str]:
    """The Bearer header for Ray's auth token (None without one) and where the token was looked for."""
    from farm.cluster.connect import auth_token

    token, where = auth_token()
    return ({"Authorization": f"Bearer {token}"} if token else None), where


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "job"


def _staging(spec: Path, overrides: list[str]) -> tuple[str, list[str]]:
    """A folder holding the spec's folder (small files) and the overrides: the job's working dir."""
    stage = Path(tempfile.mkdtemp(prefix="sdfarm-submit-"))
    for item in spec.parent.iterdir():
        if item.is_file() and item.stat().st_size <= _MAX_UPLOAD_FILE:
            shutil.copy2(item, stage / item.name)
    names = []
    for index, override in enumerate(overrides):
        name = f"_override_{index}.yaml"
        shutil.copy2(override, stage / name)
        names.append(name)
    return str(stage), names


def submit(address: str | None, spec: str, job_name: str, *, overrides: list[str], scale: str | None,
           priority: int, out: str | None, pipeline_args: list[str]) -> str:
    """Submit `farm run SPEC` as a Ray job; returns its submission id."""
    jobs_api = client(address)
    stage, override_names = _staging(Path(spec).resolve(), overrides)
    submission_id = f"sdfarm-{_slug(job_name)}-{secrets.token_hex(3)}"
    command = ["run", Path(spec).name, "--job-key", submission_id, "--priority", str(priority), "--quiet"]
    for name in override_names:
        command += ["--override", name]
    if scale:
        command += ["--scale", scale]
    if out:
        command += ["--out", out]
    command += pipeline_args
    try:
        _submit(jobs_api, entrypoint=entrypoint(command), submission_id=submission_id,
                runtime_env={"working_dir": stage}, entrypoint_num_cpus=0,
                metadata={"sdfarm": "1", "job": job_name, "priority": str(priority), "spec": spec})
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return submission_id


def _submit(jobs_api, retry_s: float = 60, **request) -> None:
    """Submit, waiting out a head whose job agent is still starting (right after `ray up`)."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            jobs_api.submit_job(**request)
            return
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise ClusterError(f"submitting {request['submission_id']}: {first_line(exc)}") from None
            time.sleep(1)


def farm_jobs(address: str | None) -> list:
    """The cluster's farm jobs (JobDetails), newest last."""
    farm_details = [details for details in client(address).list_jobs() if (details.metadata or {}).get("sdfarm")]
    return sorted(farm_details, key=lambda details: details.start_time or 0)


def progress_of(address: str | None, details) -> dict:
    """The latest progress line a job's driver printed ({} before the first), read from the end
    of its log: a few KB however long the job has run (the driver prints one every 10 s, so the
    last lines hold one unless a long traceback ends the log; then a longer tail is read once)."""
    for lines in TAIL_LINES:
        tail = log_tail(address, details, lines)
        for line in reversed(tail.splitlines()):
            if line.startswith(PROGRESS_MARK):
                return json.loads(line[len(PROGRESS_MARK):])
        if tail.count("\n") < lines:  # the whole log was read
            break
    return {}


def log_tail(address: str | None, details, lines: int) -> str:
    """The last `lines` lines of a job's driver log, from the dashboard's log API (the Jobs API
    only hands out whole logs); "" while the job has no driver log yet."""
    import requests

    if not details.driver_node_id:
        return ""
    url = api_address(address)
    url = url if "://" in url else f"http://{url}"
    try:
        answer = requests.get(f"{url}/api/v0/logs/file", timeout=30, headers=_auth_headers()[0],
                              params={"submission_id": details.submission_id, "node_id": details.driver_node_id,
                                      "lines": lines})
    except requests.RequestException:  # the head went away mid-listing: this job shows no progress
        return ""
    return answer.text if answer.status_code == 200 else ""


def describe(details, progress: dict) -> str:
    """One line of `farm jobs` for a job's JobDetails and its latest progress."""
    meta = details.metadata or {}
    state = details.status.value if hasattr(details.status, "value") else str(details.status)
    if progress:
        counts = f"{progress['done']}/{progress['total']} done, {progress['failed']} failed"
        eta = progress.get("eta_s")
        counts += f", ETA {duration(eta)}" if eta and state == "RUNNING" else ""
        if progress.get("paused"):
            state += " (paused)"
        for fetch in progress.get("fetching", []) if state == "RUNNING" else []:
            counts += f"; copying model {fetch['model']} to a node: {fetch['done'] / 2**30:.2f} of " \
                      f"{fetch['total'] / 2**30:.2f} GiB"
    else:
        counts = "no progress yet"
    priority, job_name = meta.get("priority", "0"), meta.get("job", "")
    return f"{details.submission_id}  {state:<10} priority {priority:>3}  {job_name}: {counts}"


def duration(seconds: float) -> str:
    """4m05s, 2h10m: for ETAs and estimates."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def job_info(address: str | None, submission_id: str):
    """The job's JobDetails; a ClusterError when the cluster has no such job."""
    try:
        return client(address).get_job_info(submission_id)
    except RuntimeError:
        raise ClusterError(f"{submission_id}: no such job (see `farm jobs`)") from None


def cancel(address: str | None, submission_id: str) -> bool:
    """Stop the job's driver: it flushes its manifest and gives its workers back (SIGTERM)."""
    job_info(address, submission_id)
    return client(address).stop_job(submission_id)


def control(address: str | None, action: str, key: str = "", timeout_s: float = 120) -> dict:
    """Run `farm control ACTION KEY` on the head (it reaches the pool's keeper) and return its answer."""
    jobs_api = client(address)
    submission_id = f"sdfarm-control-{action}-{secrets.token_hex(3)}"
    _submit(jobs_api, entrypoint=entrypoint(["control", action, key]),
            submission_id=submission_id, entrypoint_num_cpus=0, metadata={"sdfarm-control": action})
    deadline = time.monotonic() + timeout_s
    while (status := str(jobs_api.get_job_status(submission_id))) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.monotonic() > deadline:
            jobs_api.stop_job(submission_id)
            raise ClusterError(f"farm control {action}: no answer from the head in {timeout_s:.0f} s")
        time.sleep(0.3)
    logs = jobs_api.get_job_logs(submission_id)
    jobs_api.delete_job(submission_id)
    answers = [line for line in logs.splitlines() if line.startswith("{")]
    if status != "SUCCEEDED" or not answers:
        raise ClusterError(f"farm control {action}: failed on the head: {(logs.strip().splitlines() or ['?'])[-1]}")
    return json.loads(answers[-1])


def resume(address: str | None, submission_id: str) -> str:
    """Release a paused job, or resubmit a stopped/failed one: only tasks without `ok` rows render."""
    details = job_info(address, submission_id)
    state = str(details.status)
    if state in ("PENDING", "RUNNING"):
        if not control(address, "resume", submission_id).get("found"):
            raise ClusterError(f"{submission_id}: running, but not waiting in the pool (nothing to resume)")
        return submission_id
    base = re.sub(r"-r\d+$", "", submission_id)
    taken = {other.submission_id for other in client(address).list_jobs()}
    new_id = next(f"{base}-r{n}" for n in range(1, 10_000) if f"{base}-r{n}" not in taken)
    entrypoint = details.entrypoint.replace(f"--job-key {submission_id}", f"--job-key {new_id}")
    _submit(client(address), entrypoint=entrypoint, submission_id=new_id, runtime_env=details.runtime_env,
            entrypoint_num_cpus=0, metadata=details.metadata)
    return new_id

