"""By default a run prints what the user needs, once: one filter summary line, no third-party noise known to be
harmless, read failures once per file, and an iteration line whose TFLOP/s is not rounded to zero."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mindspeed_mm_osp import platform
from mindspeed_mm_osp.platform.quiet import HARMLESS_LOG_MESSAGES
from mindspeed_mm_osp.training.logging import _tflops
from helpers import training_argv

ROOT = Path(__file__).resolve().parents[2]
# What the silenced sources print: megatron-core's import-time notices, Megatron-FSDP's INFO lines,
# transformers' weight-loading bars, and dynamo's warning about an lru_cache inside compiled code.
SILENCED = ("Transformer Engine", "Apex", "Megatron-FSDP", "Loading weights", "lru_cache", "UserWarning")


@pytest.mark.slow  # torchrun with 2 ranks: ~25 s
def test_tp2_run_prints_one_filter_line_and_no_silenced_noise(tiny_assets, tmp_path):
    argv = training_argv(tiny_assets, "--sequence-parallel", "--save", str(tmp_path / "ckpt"), iters=2, tp=2)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "pretrain.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert [line for line in log.splitlines() if any(s in line for s in SILENCED)] == []
    summary = [line for line in log.splitlines() if line.startswith("annotation filter")]
    assert len(summary) == 1 and "records kept" in summary[0] and "OSP_LOG_LEVEL=DEBUG" in summary[0]
    assert "4 files broken on purpose" in summary[0]  # the synthetic set says which failures are deliberate
    assert "samples kept" not in log  # the table is at DEBUG level
    failed = re.findall(r"read failed \(\w+: (\S+?)\)", log)
    assert len(failed) == len(set(failed))  # once per file, whichever TP rank read it
    tflops = re.findall(r"throughput per device \(TFLOP/s/device\): ([0-9.]+)", log)
    assert len(tflops) == 2 and all(float(t) > 0 for t in tflops)


def test_harmless_third_party_lines_are_dropped_and_nothing_else(caplog):
    platform.silence_third_party()
    with caplog.at_level(logging.INFO):
        for name, message in HARMLESS_LOG_MESSAGES.items():
            logging.getLogger(name).info(message)
            logging.getLogger(name).info("Megatron-FSDP: some other news")
    assert [r.getMessage() for r in caplog.records] == ["Megatron-FSDP: some other news"] * len(HARMLESS_LOG_MESSAGES)


def test_transformers_weight_bars_are_off():
    import transformers.utils.logging as hf_logging

    platform.silence_third_party()
    assert not hf_logging.is_progress_bar_enabled()


@pytest.mark.parametrize("value, text", [(0.0, "0.000"), (0.000162, "0.000162"), (0.0123, "0.0123"),
                                         (0.5, "0.500"), (312.25, "312.250")])
def test_tflops_keep_three_significant_digits(value, text):
    assert _tflops(value) == text


def test_filter_table_is_one_line_by_default_and_whole_at_debug(tiny_assets, caplog):
    from mindspeed_mm_osp.config import load_data_config
    from mindspeed_mm_osp.data.loader import build_index_from_config

    cfg = load_data_config(str(tiny_assets["data_json"]))
    with caplog.at_level(logging.INFO, logger="mindspeed_mm_osp.data.loader"):
        _, stats = build_index_from_config(cfg, global_batch_size=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "mindspeed_mm_osp.data.loader"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"{stats.kept} of {stats.records_in} records kept" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="mindspeed_mm_osp.data.loader"):
        build_index_from_config(cfg, global_batch_size=1)
    assert stats.table() in caplog.text
