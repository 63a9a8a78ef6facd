"""The profiled step's report (KVFORGE_PROFILE_STEP): its busy time is the union of kernel intervals."""

from types import SimpleNamespace

import torch

from kvforge.trainer.train import busy_time_us, write_profile


def span(start, end):
    return SimpleNamespace(start=start, end=end)


def test_busy_time_counts_overlapping_kernels_once():
    # Two streams overlapping over [5, 10], a gap over [12, 20], a kernel nested in another.
    intervals = [span(20, 30), span(0, 10), span(5, 12), span(22, 25)]
    assert busy_time_us(intervals) == 12 + 10
    assert busy_time_us([]) == 0


def test_write_profile_reports_the_wall_and_the_host_side(tmp_path):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        torch.ones(64, 64) @ torch.ones(64, 64)
    path = tmp_path / "profile_step3.txt"
    write_profile(profiler, path, torch.device("cpu"), wall_s=0.0125)
    text = path.read_text()
    assert text.startswith("step wall time 12.5 ms")
    assert "aten::mm" in text and "sorted by self_cpu_time_total (the host's side)" in text
