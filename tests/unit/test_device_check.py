"""The offline device check's parts that run without a GPU: the step list and budgets, the report assembled from
step logs, and the sampling-latency benchmark's arithmetic and its CPU run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))
STEPS = ("env", "install", "gpu-tests", "planner", "mfu", "profile", "skiparse", "optimizer", "e2e", "latency")


def test_dry_run_lists_every_step_with_a_budget_inside_seven_minutes():
    out = subprocess.run(["bash", "scripts/device_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    budgets = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1].endswith("s") and parts[1][:-1].isdigit():
            budgets[parts[0]] = int(parts[1][:-1])
    assert tuple(budgets) == STEPS + ("report",)
    assert budgets["latency"] <= 120 and sum(budgets.values()) <= 420
    assert f"total budget: {sum(budgets.values())} s" in out


def test_unknown_flag_is_a_usage_error():
    result = subprocess.run(["bash", "scripts/device_check.sh", "--frobnicate"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "--frobnicate" in result.stderr and "Traceback" not in result.stderr


def test_report_reads_the_step_logs_into_figures_and_one_summary_line(tmp_path):
    from device_report import build_report, summary_line

    work = tmp_path
    (work / "steps.tsv").write_text("install\t0\t4\t20\nskiparse\t0\t9\t20\noptimizer\t124\t20\t20\n")
    (work / "skiparse.log").write_text("mode            k        ms   speed-up vs dense   ideal\n"
                                       "dense           1      80.0                1.00    1.00\n"
                                       "single-skip     4      25.0                3.20    3.94\n")
    (work / "optimizer.log").write_text('{"device": "cuda", "params": 10, "copy_bytes_per_s": 4e12, '
                                        '"results": {"FusedEmaAdamW(fused)": {"ms": 1.0, "bytes_per_s": 3e12}}}\n')
    (work / "mfu_57x288x512.json").write_text(json.dumps({"tflops": 470.0, "mfu": 0.475}))
    report = build_report(work)
    assert report["figures"]["skiparse"] == {"dense_ms": 80.0, "single-skip k=4": 3.2}
    assert report["figures"]["optimizer"] == {"copy_gb_s": 4000.0, "FusedEmaAdamW(fused)": 0.75}
    assert [s["ok"] for s in report["steps"]] == [True, True, False] and report["steps"][2]["timed_out"]
    line = summary_line(report, "31")
    assert line.startswith("device_check: 2/3 steps ok in 31 s (install=ok skiparse=ok optimizer=TIMEOUT)")
    assert "mfu_57x288x512 470 TFLOP/s MFU 47.5% (target 45%)" in line
    assert "skiparse k=4 3.20x dense (target 2.8x)" in line and "FusedEmaAdamW 75% of copy (target 70%)" in line


def test_seconds_per_video_add_up_from_the_stage_times():
    from bench_sampling_latency import per_video

    rows = {"cfg_step": {"seconds": 2.0}, "folded_step": {"seconds": 1.0}, "cached_skip_step": {"seconds": 0.25},
            "step_cache_run": {"skipped_fraction": 0.4}, "cfg_step_compiled": {"seconds": 1.5},
            "vae_decode": {"seconds": 10.0}, "text_encoders": {"seconds": 0.5}}
    got = {v["sampler"]: (v["denoise_s"], v["with_decode_s"], v["total_s"]) for v in per_video(rows)}
    assert got == {"50 steps, batched CFG": (100.0, 110.0, 110.5),
                   "50 steps, CFG, step cache 0.05 (40% skipped)": (65.0, 75.0, 75.5),
                   "50 steps, CFG, compiled blocks": (75.0, 85.0, 85.5),
                   "4 student steps (CFG folded)": (4.0, 14.0, 14.5),
                   "8 student steps (CFG folded)": (8.0, 18.0, 18.5)}


@pytest.mark.slow
def test_sampling_latency_quick_prints_the_table_and_writes_the_json(tmp_path, monkeypatch, capsys):
    import bench_sampling_latency

    monkeypatch.setattr(sys, "argv", ["bench_sampling_latency.py", "--quick", "--iters", "1",
                                      "--json", str(tmp_path / "lat.json")])
    bench_sampling_latency.main()
    out = capsys.readouterr().out
    assert "seconds per video" in out and "8 student steps (CFG folded)" in out
    data = json.loads((tmp_path / "lat.json").read_text())
    assert set(data["stages"]) == {"cfg_step", "folded_step", "cached_skip_step", "step_cache_run", "text_encoders",
                                   "vae_decode"}
    assert 0 < data["stages"]["step_cache_run"]["skipped_fraction"] < 1
    assert data["per_video"][0]["denoise_s"] == pytest.approx(50 * data["stages"]["cfg_step"]["seconds"])
