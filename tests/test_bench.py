"""The benchmark's measuring code on small sizes (the figures themselves come from scripts/bench)."""

from farm.bench import affinity, grid_speed, plan_scale


def test_affinity_switches_less_than_fifo():
    result = affinity()
    assert 0 < result["affinity_switches"] < result["fifo_switches"]
    assert result["affinity_switches"] <= 280  # at most one switch per checkpoint group


def test_plan_scale_measures_a_real_plan(farm_cache):
    result = plan_scale(2_000)
    # the manifest holds every other planned task: exactly the other half is left to render
    assert result["plan_tasks"] == 2_000 and result["plan_checked_left"] == 1_000
    assert 0 < result["plan_1m_peak_gb"] < 24


def test_grid_speed_compares_like_with_like(farm_cache):
    result = grid_speed(24)
    # both sides place the same 24 images
    assert result["grid_cells"] == result["plain_cells"] == 24


def test_gpu_mode_code_path_on_cpu(tiny_model):
    from farm.bench import gpu_mode

    result = gpu_mode(str(tiny_model), device="cpu", size=64, steps=2, repeats=1)
    assert result["gpu_device"] == "cpu" and "gpu_memory_plan" not in result  # no VRAM to plan for on a CPU
    # 22 switches between two LoRAs: each was read from disk once, the rest were cached switches
    assert result["gpu_lora_loads"] == 2 and result["gpu_lora_switch_ms"] > 0
