"""README claims that fit no other test file, each checked as a user meets it: real local Ray
(the session cluster), the tiny model, real Parquet, PNG and safetensors files. Expected values
come from the README's text and from independent records (the manifest, `log.csv`, hashlib)."""

from __future__ import annotations

import csv
import hashlib
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from local_cluster import kill_marked, scrape_metrics

from farm.sweep.plan import plan_job
from farm.sweep.spec import parse_spec

# --- metrics ----------------------------------------------------------------------------------

_SERIES = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)\{(?P<labels>.*)\}\s+(?P<value>\S+)$")


def prometheus_series(text: str, name: str) -> list[tuple[dict, float]]:
    """Every sample of metric `name` in a Prometheus text exposition: (labels, value)."""
    found = []
    for line in text.splitlines():
        match = _SERIES.match(line.strip())
        if match and match["name"] == name:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"]))
            found.append((labels, float(match["value"])))
    return found


def cumulative(buckets: list[tuple[dict, float]]) -> dict[float, float]:
    """A histogram's `_bucket` samples summed over series: upper bound `le` → observations ≤ it."""
    totals: dict[float, float] = {}
    for labels, value in buckets:
        bound = float(labels["le"])
        totals[bound] = totals.get(bound, 0) + value
    return totals


def expected_buckets(buckets: list[tuple[dict, float]], values: list[float]) -> dict[float, float]:
    """The same bounds filled with `values` (what the run recorded itself)."""
    return {bound: float(sum(v <= bound for v in values)) for bound in cumulative(buckets)}


def farm_series(text: str) -> set[str]:
    """Names of the farm's series in a Prometheus text exposition."""
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line.startswith("ray_sdfarm_")}


def note_export(text: str, served: set, losses: list, run: str) -> None:
    """Add to `served` the farm's series names in one scrape, and to `losses` each value of `run`'s
    loss gauge in it (Ray serves a gauge only while it is fresh)."""
    served.update(farm_series(text))
    losses.extend(v for labels, v in prometheus_series(text, "ray_sdfarm_train_loss") if labels.get("run") == run)


def watch_export(port: int, served: set, losses: list, run: str, stop) -> None:
    """Scrape every second until `stop` is set, noting what each scrape serves."""
    while not stop.is_set():
        try:
            note_export(scrape_metrics(port), served, losses, run)
        except OSError:  # the export is not up yet
            pass
        stop.wait(1)


def test_render_and_training_metrics_reach_rays_metrics_export(ray_cluster, tmp_path):
    """README "Metrics": `sdfarm_step_seconds` (histogram, by node), `sdfarm_lora_switches` and
    `sdfarm_lora_switch_seconds`, `sdfarm_train_step_seconds` and `sdfarm_train_loss` (by run),
    served by the node's metrics port with names prefixed `ray_`. Their values must agree with what
    the run recorded itself: the manifest's `render_s` / `lora_switch_s`, and `log.csv`."""
    import ray

    from farm.cluster.actors import start_workers
    from farm.cluster.dispatch import run_study
    from farm.models.tiny import write_tiny_dataset
    from farm.render.pipeline import PipelineOptions
    from farm.runs.manifest import RunFolder
    from farm.train.study import Evaluation, Study

    write_tiny_dataset(tmp_path / "data", images=4, repeats=1, reg_images=0)
    job = parse_spec({
        "job": "metrics-claim", "model": "tiny:sdxl",
        "train": {"train_data_dir": "data/img", "resolution": 64, "train_batch_size": 2, "network_dim": 4,
                  "learning_rate": 1e-3, "max_train_epochs": 1},
        "variants": {"mrun": {}},
        "evaluate": {"defaults": {"steps": 2, "width": 64, "height": 64, "seed": 11},
                     "axes": {"prompt": ["photo of a man", "photo of a w0ut3r man"]}},
    }, "study.yaml")
    folder = RunFolder(tmp_path / "out")
    study = Study(job, tmp_path, "study.yaml", folder.root)
    trains = [t for t, _ in study.runs(plan_only=True)]
    evaluation = Evaluation(job.evaluation_job(), tmp_path, "study.yaml")
    # workers that stay up until the scrape (the export is per worker process)
    workers = start_workers(2, PipelineOptions(), use_gpus=True)
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    # a gauge reaches the export a few seconds after it was set and leaves it ~20 s after (Ray drops
    # series not reported again), so the export is watched while the study runs and after it, until
    # the loss and every series the dashboard queries were seen; counters and histograms stay
    from farm.cluster.metrics import grafana_dashboard

    queried = {name for panel in grafana_dashboard()["panels"] for target in panel["targets"]
               for name in re.findall(r"ray_sdfarm_\w+", target["expr"])}
    served, losses, stop = set(), [], threading.Event()
    watcher = threading.Thread(target=watch_export, args=(port, served, losses, "mrun", stop))
    watcher.start()
    try:
        summary = run_study(trains, evaluation.replan, folder, quiet=True, pool=workers)
        assert (summary.ok, summary.failed, summary.failed_runs) == (2, 0, [])
        rows = folder.read().to_pylist()
        log = list(csv.DictReader((folder.root / "train" / "mrun" / "log.csv").open()))
        assert rows and log
        deadline, text = time.monotonic() + 90, ""
        while time.monotonic() < deadline:  # Ray exports every few seconds
            text = scrape_metrics(port)
            note_export(text, served, losses, "mrun")
            if (any(labels.get("run") == "mrun"
                    for labels, _ in prometheus_series(text, "ray_sdfarm_train_step_seconds_count"))
                    and any(labels.get("job") == "metrics-claim"
                            for labels, _ in prometheus_series(text, "ray_sdfarm_images_rendered_total"))
                    and losses and queried <= served):
                break
            time.sleep(1)
    finally:
        stop.set()
        watcher.join()
        for worker in workers:
            ray.kill(worker)

    rendered = [(labels, value) for labels, value in prometheus_series(text, "ray_sdfarm_images_rendered_total")
                if labels.get("job") == "metrics-claim"]
    assert rendered, "no sdfarm_images_rendered for this job on the metrics port"
    ours = {labels["WorkerId"] for labels, _ in rendered}  # the processes that rendered this job

    def mine(name: str) -> list[tuple[dict, float]]:
        return [(labels, value) for labels, value in prometheus_series(text, name) if labels.get("WorkerId") in ours]

    assert sum(v for labels, v in rendered if labels.get("status") == "ok") == len(rows)
    # seconds per sampler step, by node: at least one observation per image, none longer than its render
    step_count, step_buckets = mine("ray_sdfarm_step_seconds_count"), mine("ray_sdfarm_step_seconds_bucket")
    assert step_count and all("node" in labels for labels, _ in step_count)
    assert sum(v for _, v in step_count) >= len(rows)
    slowest = max(r["render_s"] for r in rows)
    assert all(count == sum(v for _, v in step_count) for bound, count in cumulative(step_buckets).items()
               if bound >= slowest)
    # LoRA switches: one per image the manifest says needed a switch, their seconds as recorded there
    switched = [r["lora_switch_s"] for r in rows if r["lora_switch_s"] > 0]
    assert switched, "the evaluation renders apply the trained LoRA: at least one switch"
    assert sum(v for _, v in mine("ray_sdfarm_lora_switches_total")) == len(switched)
    assert sum(v for _, v in mine("ray_sdfarm_lora_switch_seconds_count")) == len(switched)
    # (Ray's export sums a histogram from its bucket midpoints: compare bucket by bucket instead)
    assert cumulative(mine("ray_sdfarm_lora_switch_seconds_bucket")) == expected_buckets(
        mine("ray_sdfarm_lora_switch_seconds_bucket"), switched)
    # training, by run: one step time per log.csv line, and the loss of the latest step
    train_count = [v for labels, v in prometheus_series(text, "ray_sdfarm_train_step_seconds_count")
                   if labels.get("run") == "mrun"]
    train_buckets = [(labels, v) for labels, v in prometheus_series(text, "ray_sdfarm_train_step_seconds_bucket")
                     if labels.get("run") == "mrun"]
    assert sum(train_count) == len(log)
    assert cumulative(train_buckets) == expected_buckets(train_buckets, [float(line["step_s"]) for line in log])
    # the loss gauge, as seen while the run was live: each value one the run logged for a step
    assert losses, "no sdfarm_train_loss for this run on the metrics port"
    logged = [float(line["loss"]) for line in log]
    assert all(any(seen == pytest.approx(value, abs=1e-5) for value in logged) for seen in losses), (losses, logged)
    # the farm's Grafana dashboard queries only series this export serves (during the run or after)
    assert len(queried) >= 10 and queried <= served, queried - served


# --- what a task is: content hashes ------------------------------------------------------------

def _plan(folder: Path, model: str):
    spec = {"job": "ident", "model": model, "defaults": {"prompt": "photo of a man", "steps": 2, "width": 64,
                                                         "height": 64, "seed": 5}, "axes": {"seed": [5, 6]}}
    return plan_job(parse_spec(spec, "job.yaml"), folder, "job.yaml")


def test_models_are_identified_by_the_sha256_of_their_content(tiny_model, tmp_path):
    """README: "Models and LoRAs are identified by the sha256 of their content, so renaming a file
    renders nothing again, and re-training a file under the same name renders it again"."""
    from safetensors.torch import load_file, save_file

    weights = tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(weights, tmp_path / "model-a.safetensors")
    shutil.copy(weights, tmp_path / "renamed.safetensors")
    first, renamed = _plan(tmp_path, "model-a.safetensors"), _plan(tmp_path, "renamed.safetensors")
    assert {t.model_sha256 for t in first.tasks} == {hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert [t.task_id for t in first.tasks] == [t.task_id for t in renamed.tasks]
    state = load_file(weights)
    key = sorted(state)[0]
    state[key] = state[key] + 0.01  # other weights, same name (a re-trained file)
    save_file(state, tmp_path / "model-a.safetensors")
    retrained = _plan(tmp_path, "model-a.safetensors")
    assert {t.model_sha256 for t in retrained.tasks} == {
        hashlib.sha256((tmp_path / "model-a.safetensors").read_bytes()).hexdigest()}
    assert not {t.task_id for t in retrained.tasks} & {t.task_id for t in first.tasks}
    # a diffusers folder: a copy under another name is the same model; one changed file is another
    shutil.copytree(tiny_model, tmp_path / "copy-of-tiny")
    tiny, copy = _plan(tmp_path, "tiny:sdxl"), _plan(tmp_path, "copy-of-tiny")
    assert [t.task_id for t in tiny.tasks] == [t.task_id for t in copy.tasks]
    save_file(state, tmp_path / "copy-of-tiny" / "unet" / "diffusion_pytorch_model.safetensors")
    changed = _plan(tmp_path, "copy-of-tiny")
    assert not {t.task_id for t in changed.tasks} & {t.task_id for t in tiny.tasks}


# --- lost tasks ---------------------------------------------------------------------------------

def _dead_workers(count: int) -> list:
    """Workers that are gone before their first task (max_restarts=0): every chunk sent to one is
    lost with it, as with a task that crashes each worker it touches."""
    import ray

    from farm.cluster.actors import worker_class
    from farm.render.pipeline import PipelineOptions

    workers = [worker_class().options(num_gpus=0, num_cpus=0, max_restarts=0).remote(90 + i, PipelineOptions())
               for i in range(count)]
    for worker in workers:
        ray.kill(worker, no_restart=True)
    return workers


@pytest.mark.parametrize("workers", [1, 3])
def test_a_task_lost_with_its_worker_fails_at_the_documented_limits(lora_dir, tmp_path, workers):
    """README "Worker death": "A task fails only when it was lost with 3 different workers, or 20
    times in all". The driver's bookkeeping, fed the losses dying workers cause (a chunk lost with
    its worker, Ray restarting it under the same key), workers taking turns: each task fails at
    the very loss that reaches either limit, never sooner, and is not sent out again."""
    from farm.cluster.dispatch import _Feed
    from farm.runs.manifest import RunFolder

    plan = _plan(lora_dir, "tiny:sdxl")
    feed = _Feed(RunFolder(tmp_path), quiet=True, chunk_size=1)
    feed.add(plan.tasks)
    lost_on: dict[str, list[int]] = {}
    while feed.queue:
        worker = sum(map(len, lost_on.values())) % workers
        (task,) = feed.queue.take(worker)
        lost_on.setdefault(task.task_id, []).append(worker)
        feed.requeue_lost([task], worker, RuntimeError("The actor died unexpectedly"))
    feed.close()
    rows = RunFolder(tmp_path).read().to_pylist()
    assert len(rows) == 2 and all(r["status"] == "failed" for r in rows)
    for row in rows:
        workers_of_task = lost_on[row["task_id"]]
        n = int(re.search(r"lost with its worker (\d+) times", row["error"])[1])
        first_at_limit = next(i + 1 for i in range(len(workers_of_task))
                              if len(set(workers_of_task[:i + 1])) == 3 or i + 1 == 20)
        assert n == len(workers_of_task) == first_at_limit, (n, workers_of_task)
    if workers == 1:
        assert [len(w) for w in lost_on.values()] == [20, 20]


def test_workers_dead_for_good_fail_the_rest_at_once(ray_cluster, lora_dir, tmp_path):
    """Handed-in workers Ray will not restart (max_restarts=0, killed): each chunk sent to one is
    lost once, the worker is dropped, and with none left the job fails what is left in one go."""
    from farm.cluster.dispatch import run_plan
    from farm.runs.manifest import RunFolder

    plan = _plan(lora_dir, "tiny:sdxl")
    summary = run_plan(plan, RunFolder(tmp_path), chunk_size=1, quiet=True, pool=_dead_workers(2))
    assert (summary.ok, summary.failed) == (0, 2)
    rows = RunFolder(tmp_path).read().to_pylist()
    # each task was lost at most once on each worker (fewer than 3), so none failed for its losses
    assert {r["error"] for r in rows} == {"no eligible worker left: every worker died more often than Ray restarts it"}


# --- training run folders -----------------------------------------------------------------------

def _train_once(tmp_path: Path, model: str):
    from farm.render.pipeline import PipelineOptions
    from farm.train.study import Study
    from farm.train.trainer import train_run

    job = parse_spec({"job": "refuse", "model": model,
                      "train": {"train_data_dir": "data/img", "resolution": 64, "train_batch_size": 2,
                                "network_dim": 4, "max_train_steps": 1},
                      "variants": {"v": {}}}, "study.yaml")
    (run, _), = Study(job, tmp_path, "study.yaml", tmp_path / "out").runs()
    return list(train_run(run, "cpu", pipeline=PipelineOptions(device="cpu", threads=1)))


@pytest.fixture
def trained_folder(tiny_model, tmp_path):
    """A variant trained once (1 step) on `base/`, a copy of the tiny model, in tmp_path/out."""
    from farm.models.tiny import write_tiny_dataset

    write_tiny_dataset(tmp_path / "data", images=2, repeats=1, reg_images=0)
    shutil.copytree(tiny_model, tmp_path / "base")
    assert len(_train_once(tmp_path, "base")) == 1
    assert len(_train_once(tmp_path, "base")) == 1  # unchanged: the folder is reused (resumed, done)
    return tmp_path


def test_a_run_folder_whose_model_changed_is_refused(trained_folder):
    """README "Training jobs": "a variant whose options, images or model changed refuses the old folder"."""
    from safetensors.torch import load_file, save_file

    from farm.errors import FarmError

    weights = trained_folder / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = sorted(state)[0]
    state[key] = state[key] + 0.01
    save_file(state, weights)
    with pytest.raises(FarmError, match="trained with other options, images or model"):
        _train_once(trained_folder, "base")


def test_a_run_folder_whose_images_changed_is_refused(trained_folder):
    from PIL import Image

    from farm.errors import FarmError

    image = next((trained_folder / "data" / "img").rglob("*.png"))
    with Image.open(image) as old:
        size = old.size
    Image.new("RGB", size, (0, 255, 0)).save(image)
    with pytest.raises(FarmError, match="trained with other options, images or model"):
        _train_once(trained_folder, "base")


def test_a_run_folder_whose_options_changed_is_refused(trained_folder):
    """The part of the same claim that holds: other options refuse the folder (control for the two above)."""
    from farm.errors import FarmError
    from farm.render.pipeline import PipelineOptions
    from farm.train.study import Study
    from farm.train.trainer import train_run

    job = parse_spec({"job": "refuse", "model": "base",
                      "train": {"train_data_dir": "data/img", "resolution": 64, "train_batch_size": 2,
                                "network_dim": 8, "max_train_steps": 1},
                      "variants": {"v": {}}}, "study.yaml")
    (run, _), = Study(job, trained_folder, "study.yaml", trained_folder / "out").runs()
    with pytest.raises(FarmError, match="trained with other options, images or model"):
        list(train_run(run, "cpu", pipeline=PipelineOptions(device="cpu", threads=1)))



# --- a local run keeps Ray's token auth on -------------------------------------------------------

LOCAL_RUN_PROBE = r'''
import json, os, subprocess, sys, urllib.error, urllib.request
import ray
from farm.cluster.connect import auth_token, connect

connect(gpus=1, local=True)  # what `farm run --local` does
info = ray.worker.global_worker.node.address_info
token, where = auth_token()

def jobs_api(headers):
    request = urllib.request.Request(f"http://{info['webui_url']}/api/jobs/", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code

def join(with_token):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": with_token}
    code = f"import ray; ray.init(address={info['gcs_address']!r}); print('joined')"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout

print(json.dumps({"where": where, "dashboard": info["webui_url"], "no_token": jobs_api({}),
                  "token": jobs_api({"Authorization": f"Bearer {token}"}),
                  "gcs_wrong": "joined" in join("0" * 32), "gcs_right": "joined" in join(token)}))
ray.shutdown()
'''


def test_a_local_run_refuses_whoever_lacks_its_token(tmp_path):
    """README "Ray exposure": a local `farm run` starts Ray with token auth on (its GCS listens on
    the routable address): its Jobs API answers 401 without the token, and its GCS lets in only a
    client with the token Ray wrote to ~/.ray/auth_token."""
    import json
    import os
    import subprocess
    import sys

    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="sdfarm-auth-", dir="/tmp")  # short: Ray's socket paths fit 107 bytes
    env = {**os.environ, "HOME": str(tmp_path), "RAY_TMPDIR": ray_tmp}
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(name, None)
    try:
        done = subprocess.run([sys.executable, "-c", LOCAL_RUN_PROBE], env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        kill_marked(f"RAY_TMPDIR={ray_tmp}".encode(), signal.SIGKILL)  # whatever outlived ray.shutdown
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["where"] == str(tmp_path / ".ray" / "auth_token") and probe["dashboard"].startswith("127.0.0.1:")
    assert (probe["no_token"], probe["token"]) == (401, 200)
    assert (probe["gcs_wrong"], probe["gcs_right"]) == (False, True)
    assert "ray get-auth-token" in done.stderr  # the dashboard link comes with how to get past its token page
