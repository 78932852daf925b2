"""The farm's numbers in Ray's metrics system (the dashboard's Metrics view, Prometheus/Grafana).

Created on first use inside a Ray process (`ray.util.metrics` needs a connected worker), one set
per process. Every name starts with `sdfarm_`; Ray exports them as `ray_sdfarm_…` on each node's
metrics port.
"""

from __future__ import annotations

from functools import cache

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
