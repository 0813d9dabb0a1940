"""extract_features CLI: a killed extraction resumes without recomputing finished shards; torchrun on 2 ranks."""

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OSP_DEVICE": "cpu"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mindspeed_mm_osp.testing import make_tiny_setup

    return make_tiny_setup(tmp_path_factory.mktemp("features"), num_videos=4, num_images=4)


def _cmd(setup, out, *extra, launcher=(sys.executable, "-m")):
    return [*launcher, "mindspeed_mm_osp.tools.extract_features", "--mm-data", str(setup.data_json),
            "--mm-model", str(setup.model_json), "--out", str(out), "--shard-size", "2", "--no-progress", *extra]


def test_killed_extraction_resumes_without_recomputing(setup, tmp_path):
    out = tmp_path / "cache"
    proc = subprocess.Popen(_cmd(setup, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (out / "shard-00001.json").exists():  # two shards done: kill mid-run
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "index.json").exists()
    done = sorted(p.name for p in out.glob("shard-*.json"))
    mtimes = {name: (out / name.replace(".json", ".safetensors")).stat().st_mtime_ns for name in done}
    run = subprocess.run(_cmd(setup, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    reused = [int(name[6:11]) for name in done]
    assert f"reused {reused}" in run.stdout
    assert {name: (out / name.replace(".json", ".safetensors")).stat().st_mtime_ns for name in done} == mtimes
    assert (out / "index.json").exists()


def test_torchrun_two_ranks_interrupted_then_completed(setup, tmp_path):
    out = tmp_path / "cache"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m")
    first = subprocess.run(_cmd(setup, out, "--stop-after-shards", "1", launcher=torchrun), env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "rank 0: computed shards [0], reused []" in first.stdout
    assert "rank 1: computed shards [1], reused []" in first.stdout
    second = subprocess.run(_cmd(setup, out, launcher=torchrun), env=ENV, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # 9 samples in shards of 2: rank 0 owns 0, 2, 4; rank 1 owns 1, 3.
    assert "rank 0: computed shards [2, 4], reused [0]" in second.stdout
    assert "rank 1: computed shards [3], reused [1]" in second.stdout
    assert (out / "index.json").exists()
