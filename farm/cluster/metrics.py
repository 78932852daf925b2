"""The farm's numbers in Ray's metrics system (the dashboard's Metrics view, Prometheus/Grafana).

Created on first use inside a Ray process (`ray.util.metrics` needs a connected worker), one set
per process. Every name starts with `sdfarm_`; Ray exports them as `ray_sdfarm_…` on each node's
metrics port.
"""

from __future__ import annotations

import os
import tempfile
from functools import cache
from pathlib import Path

_SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]


@cache
def farm_metrics():
    from ray.util.metrics import Counter, Gauge, Histogram

    class Metrics:
        images = Counter("sdfarm_images_rendered", "Images rendered (status ok or failed)",
                         tag_keys=("job", "node", "status"))
        image_seconds = Histogram("sdfarm_image_seconds", "Seconds per image (pipeline call)", _SECONDS,
                                  tag_keys=("node",))
        step_seconds = Histogram("sdfarm_step_seconds", "Seconds per sampler step",
                                 [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5], tag_keys=("node",))
        lora_switches = Counter("sdfarm_lora_switches", "LoRA set changes on a worker", tag_keys=("node",))
        lora_seconds = Histogram("sdfarm_lora_switch_seconds", "Seconds to load/switch LoRAs", _SECONDS,
                                 tag_keys=("node",))
        queue_depth = Gauge("sdfarm_queue_depth", "Tasks of a job not yet rendered", tag_keys=("job",))
        train_step_seconds = Histogram("sdfarm_train_step_seconds", "Seconds per training step", _SECONDS,
                                       tag_keys=("node", "run"))
        train_loss = Gauge("sdfarm_train_loss", "Loss of the latest training step", tag_keys=("run",))

    return Metrics()


def record_render(result, node: str) -> None:
    """Count one render result (a `render.RenderResult`)."""
    metrics = farm_metrics()
    metrics.images.inc(1, {"job": result.task.job, "node": node, "status": result.status})
    if result.status == "ok":
        metrics.image_seconds.observe(result.render_s, {"node": node})
        metrics.step_seconds.observe(result.render_s / max(result.task.steps, 1), {"node": node})
    if result.lora_switch_s > 0:  # 0.0 exactly when the LoRA set was already active
        metrics.lora_switches.inc(1, {"node": node})
        metrics.lora_seconds.observe(result.lora_switch_s, {"node": node})


def record_train_step(run_name: str, node: str, loss: float, seconds: float) -> None:
    """Time and loss of one training step of the run `run_name`."""
    metrics = farm_metrics()
    metrics.train_step_seconds.observe(seconds, {"node": node, "run": run_name})
    metrics.train_loss.set(loss, {"run": run_name})


# Grafana: one dashboard for the farm's metrics, beside the ones Ray generates for a head
# (`<ray temp dir>/session_latest/metrics/grafana/dashboards/`), on the same Prometheus data source.
# (title, unit, PromQL with a legend) per panel; Ray exports each metric with the `ray_` prefix.
PANELS = [
    ("Images per second, by node", "ops",
     [('sum by (node) (rate(ray_sdfarm_images_rendered_total{status="ok"}[1m]))', "{{node}}"),
      ('sum by (node) (rate(ray_sdfarm_images_rendered_total{status="failed"}[1m]))', "{{node}} failed")]),
    ("Seconds per image, by node", "s",
     [("sum by (node) (rate(ray_sdfarm_image_seconds_sum[5m])) / sum by (node) "
       "(rate(ray_sdfarm_image_seconds_count[5m]))", "{{node}} mean"),
      ("histogram_quantile(0.9, sum by (node, le) (rate(ray_sdfarm_image_seconds_bucket[5m])))", "{{node}} p90")]),
    ("Seconds per sampler step, by node", "s",
     [("sum by (node) (rate(ray_sdfarm_step_seconds_sum[5m])) / sum by (node) "
       "(rate(ray_sdfarm_step_seconds_count[5m]))", "{{node}}")]),
    ("LoRA switches per minute, by node", "short",
     [("60 * sum by (node) (rate(ray_sdfarm_lora_switches_total[5m]))", "{{node}}")]),
    ("Seconds per LoRA switch, by node", "s",
     [("sum by (node) (rate(ray_sdfarm_lora_switch_seconds_sum[5m])) / sum by (node) "
       "(rate(ray_sdfarm_lora_switch_seconds_count[5m]))", "{{node}}")]),
    ("Queue depth: images left, by job", "short", [("sum by (job) (ray_sdfarm_queue_depth)", "{{job}}")]),
    ("Training loss, by run", "none", [("max by (run) (ray_sdfarm_train_loss)", "{{run}}")]),
    ("Seconds per training step, by run", "s",
     [("sum by (run) (rate(ray_sdfarm_train_step_seconds_sum[5m])) / sum by (run) "
       "(rate(ray_sdfarm_train_step_seconds_count[5m]))", "{{run}}")]),
]


def grafana_dashboard() -> dict:
    """The farm's Grafana dashboard (JSON model, schema 39): a time series panel per PANELS entry,
    two per row, on the `${datasource}` Prometheus variable as Ray's own dashboards use."""
    panels = []
    for index, (title, unit, queries) in enumerate(PANELS):
        panels.append({
            "id": index + 1, "type": "timeseries", "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + n), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for n, (expr, legend) in enumerate(queries)],
        })
    return {
        "uid": "sdfarm", "title": "sdfarm: renders, LoRA switches, queue, training", "schemaVersion": 39,
        "version": 1, "editable": True, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "tags": ["sdfarm", "ray"], "panels": panels,
        "templating": {"list": [{"name": "datasource", "label": "Data source", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0}]},
    }


def ray_dashboards_folder() -> Path:
    """Where `ray start --head` writes its Grafana dashboards on this machine."""
    root = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
    return root / "session_latest" / "metrics" / "grafana" / "dashboards"
