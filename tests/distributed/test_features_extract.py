"""Feature extraction on 2 ranks: disjoint shards, one verified index, the same features as 1 rank."""

import pytest
import torch

from mindspeed_mm_osp.testing import run_distributed


def _extract(rank, world_size, data_json, model_json, out):
    from mindspeed_mm_osp.config import load_data_config, load_model_config
    from mindspeed_mm_osp.features import extract_features

    r = extract_features(load_data_config(data_json), load_model_config(model_json), out, shard_size=3, batch_size=2,
                         progress=False)
    return r.computed, r.reused, r.complete


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mindspeed_mm_osp.testing import make_tiny_setup

    return make_tiny_setup(tmp_path_factory.mktemp("features"), num_videos=4, num_images=4)


def test_two_ranks_extract_disjoint_shards_into_one_cache(setup, tmp_path):
    from mindspeed_mm_osp.config import load_data_config, load_model_config
    from mindspeed_mm_osp.features import FeatureCache, extract_features

    out = tmp_path / "cache2"
    results = run_distributed(_extract, 2, str(setup.data_json), str(setup.model_json), str(out), timeout=240)
    (c0, r0, ok0), (c1, r1, ok1) = results
    assert ok0 and ok1 and not r0 and not r1
    assert c0 == [0, 2] and c1 == [1]  # 9 samples (4 videos, 1 missing, 4 images) in shards of 3

    torch.set_num_threads(1)
    ref = tmp_path / "cache1"
    extract_features(load_data_config(setup.data_json), load_model_config(setup.model_json), ref, shard_size=4,
                     batch_size=1, progress=False)
    a, b = FeatureCache(out), FeatureCache(ref)
    assert a.samples.keys() == b.samples.keys() and a.failed.keys() == b.failed.keys() and len(a.samples) == 8
    for sid in a.samples:
        for key, t in a.latents(sid).items():
            torch.testing.assert_close(t, b.latents(sid)[key], rtol=1e-5, atol=1e-5)
    assert a.texts.keys() == b.texts.keys()
    for key in a.texts:
        for name, t in a.text_features(key).items():
            torch.testing.assert_close(t, b.text_features(key)[name], rtol=1e-5, atol=1e-5)

    # Re-running on 2 ranks recomputes nothing.
    again = run_distributed(_extract, 2, str(setup.data_json), str(setup.model_json), str(out), timeout=240)
    assert [r[0] for r in again] == [[], []] and [r[1] for r in again] == [[0, 2], [1]]
