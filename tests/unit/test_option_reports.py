"""Every sampling option says what it did: `--cache-threshold` the steps it skipped, `--parallel-vae-decode`
whether it split the decode (and why not), `--cfg-parallel` its pairs, `--compile` its blocks and their time."""

from __future__ import annotations

import logging
import re
import shutil
import warnings

import pytest

from mindspeed_mm_osp.inference import cli
from mindspeed_mm_osp.models.ae.parallel_decode import describe_plan, plan_spans
from mindspeed_mm_osp.testing import run_distributed
from helpers import make_tiny_inference

LOGGER = "mindspeed_mm_osp.inference"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return make_tiny_inference(tmp_path_factory.mktemp("option_reports"))


def _reports(caplog) -> dict[str, str]:
    """Option flag -> its report line (the text after "--flag: " or "--flag value: ")."""
    found = {}
    for record in caplog.records:
        m = re.match(r"(--[a-z-]+)( [0-9.e+-]+)?: (.*)", record.getMessage())
        if m and record.name == LOGGER:
            found.setdefault(m.group(1), []).append(m.group(3))
    return found


def test_step_cache_and_decode_report_what_they_did(config, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        cli.main(["--config", str(config), "--cache-threshold", "1e9", "--num-inference-steps", "4",
                  "--parallel-vae-decode", "--save-path", str(tmp_path)])
    reports = _reports(caplog)
    # threshold 1e9: every step but the first and the last reuses the cached residual, for each of the 2 prompts
    assert reports["--cache-threshold"] == [f"prompt {i} skipped 2 of 4 steps [1, 2]" for i in (0, 1)]
    assert reports["--parallel-vae-decode"] == ["not split: the replica has one rank, which decodes all 2 latent "
                                                "frames"]


def test_decode_plan_in_words_follows_the_plan():
    assert describe_plan(16, 2, 30).startswith("not split: 16 latent frames")
    spans = [s for s in plan_spans(100, 4, 30) if not s.empty]
    assert describe_plan(100, 4, 30) == (f"split 100 latent frames over {len(spans)} of 4 ranks: "
                                         + ", ".join(f"[{s.start}, {s.end})" for s in spans))
    assert len(spans) > 1


def _infer_collecting_reports(rank, world_size, argv):
    """The inference CLI on this rank; returns the option reports it logged."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger(LOGGER).addHandler(handler)
    logging.getLogger(LOGGER).setLevel(logging.INFO)
    cli.main(argv)
    return [line for line in lines if line.startswith("--")]


@pytest.mark.slow  # two forked ranks, ~15 s
def test_cfg_parallel_reports_its_pairs(config, tmp_path):
    rank0, rank1 = run_distributed(_infer_collecting_reports, 2, ["--config", str(config), "--cfg-parallel",
                                                                  "--parallel-vae-decode", "--save-path",
                                                                  str(tmp_path)], timeout=300)
    assert rank0 == ["--cfg-parallel: 1 pair(s): uncond rank 0 + cond rank 1 (replica 0); each step all-gathers "
                     "the two halves; prompts split over 1 replica(s)",
                     "--parallel-vae-decode: not split: 2 latent frames, and a second rank would first re-decode "
                     "the 30 latent frames before its span (the decoder's history), so one rank is fastest; "
                     "splitting pays off for latents longer than 30 frames"]
    assert rank1 == []  # reported once, on rank 0


@pytest.mark.slow  # one block through inductor, ~15 s
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU needs a C++ compiler (g++/c++ not on PATH)")
def test_compile_reports_its_blocks_and_time_without_dynamo_warnings(tmp_path, caplog):
    """One block; the attention backend is read inside the compiled block and must not trip dynamo's
    `lru_cache` warning (the accelerator choice is a plain cached value)."""
    config = make_tiny_inference(tmp_path / "one_block", num_layers=[1], sparse_n=[1])
    with caplog.at_level(logging.INFO, logger=LOGGER), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.main(["--config", str(config), "--compile", "--save-path", str(tmp_path / "out")])
    reports = _reports(caplog)["--compile"]
    assert reports[0] == "compiling 1 blocks (mode default) during the first denoising step..."
    assert re.fullmatch(r"compiled 1 blocks in [0-9]+\.[0-9] s \(the first denoising step, compilation "
                        r"included\)", reports[1]), reports
    assert len(reports) == 2
    assert not [w for w in caught if "lru_cache" in str(w.message)]
