"""Image-to-video training from text-to-video weights, on the tiny models and real videos."""

import json

import pytest
import torch

from mindspeed_mm_osp.testing import run_distributed

pytestmark = pytest.mark.slow

MASKS = {"mask_type_ratio_dict_video": {"i2v": 2, "transition": 1, "continuation": 1}}


def _train(rank, world_size, argv):
    from mindspeed_mm_osp.training.arguments import parse_args
    from mindspeed_mm_osp.training.trainer import pretrain

    return pretrain(parse_args(argv, world_size=world_size)).losses


def _argv(model_json, data_json, *extra, iters, tp=1):
    return ["--mm-data", str(data_json), "--mm-model", str(model_json), "--micro-batch-size", "1",
            "--tensor-model-parallel-size", str(tp),
            "--train-iters", str(iters), "--lr", "2e-4", "--clip-grad", "1.0", "--seed", "1234", "--log-interval",
            "1", *extra]


@pytest.fixture(scope="module")
def i2v_setup(tiny_assets, tmp_path_factory):
    """The demo's T2V training for 4 iterations, merged; model and data JSONs of T2V and I2V runs from it."""
    from mindspeed_mm_osp.checkpoint.convert import merge_checkpoint, save_merged

    root = tmp_path_factory.mktemp("i2v")
    run_distributed(_train, 1, _argv(tiny_assets["model_json"], tiny_assets["data_json"], "--save",
                                     str(root / "t2v"), iters=4), timeout=240)
    weights = save_merged(merge_checkpoint(root / "t2v"), root / "merged", "safetensors")[0]
    model = json.loads(tiny_assets["model_json"].read_text())
    model["predictor"]["from_pretrained"] = str(weights)
    (root / "t2v.json").write_text(json.dumps(model))
    model["predictor"].update(model_id="SparseUMMDiTInpaint", vae_scale_factor_t=8)
    (root / "i2v.json").write_text(json.dumps(model))
    data = json.loads(tiny_assets["data_json"].read_text())
    data["dataset_param"]["mask_config"] = MASKS
    (root / "data_i2v.json").write_text(json.dumps(data))
    return {"t2v": root / "t2v.json", "i2v": root / "i2v.json", "data": tiny_assets["data_json"],
            "data_i2v": root / "data_i2v.json"}


def test_first_step_from_t2v_weights_is_the_t2v_step(i2v_setup):
    """Zero-initialised condition channels: the I2V model's first losses equal the T2V model's on the same clips,
    noise and sigmas (the clip's latents are drawn first, as in T2V training)."""
    s = i2v_setup
    t2v = run_distributed(_train, 1, _argv(s["t2v"], s["data"], iters=2), timeout=240)[0]
    i2v = run_distributed(_train, 1, _argv(s["i2v"], s["data_i2v"], iters=2), timeout=240)[0]
    assert t2v[0] == pytest.approx(i2v[0], rel=1e-5, abs=1e-6)


def test_i2v_training_lowers_the_loss_on_the_generated_region(i2v_setup):
    s = i2v_setup
    losses = run_distributed(_train, 1, _argv(s["i2v"], s["data_i2v"], "--i2v-loss-region", "generated",
                                              "--lr-warmup-iters", "2", iters=24), timeout=300)[0]
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.85 * first, (first, last)


def test_i2v_resume_equals_uninterrupted_and_tp2_sp_equals_tp1(i2v_setup, tmp_path):
    """Masks, clips and noise are keyed: a run resumed at iteration 2 trains on what the straight run did; TP=2 +
    SP gives the TP=1 losses."""
    s = i2v_setup
    straight = run_distributed(_train, 1, _argv(s["i2v"], s["data_i2v"], iters=4), timeout=240)[0]
    first = run_distributed(_train, 1, _argv(s["i2v"], s["data_i2v"], "--save", str(tmp_path / "c"),
                                             "--exit-interval", "2", iters=4), timeout=240)[0]
    second = run_distributed(_train, 1, _argv(s["i2v"], s["data_i2v"], "--save", str(tmp_path / "c"), "--load",
                                              str(tmp_path / "c"), iters=4), timeout=240)[0]
    assert first + second == straight
    tp2 = run_distributed(_train, 2, _argv(s["i2v"], s["data_i2v"], "--sequence-parallel", iters=4, tp=2), tp=2,
                          timeout=240)
    assert tp2[0] == tp2[1]
    torch.testing.assert_close(torch.tensor(tp2[0]), torch.tensor(straight), rtol=1e-4, atol=1e-5)


def test_i2v_with_encoder_dp_equals_the_run_without(i2v_setup, tmp_path):
    """enable_encoder_dp: each TP peer encodes its own micro-batch, and its clip latents, condition latents and
    latent mask travel to the peer with the all-gather. Clips, masks, posterior draws and noise are keyed by the
    replica's micro-batch, so the loss equals that of the same run without encoder DP (same global batch of 2,
    hence the same data order; one iteration trains on both peers' micro-batches): a condition lost, stale or
    swapped between peers would show."""
    model = json.loads(i2v_setup["i2v"].read_text())
    model["enable_encoder_dp"] = True
    (tmp_path / "i2v_edp.json").write_text(json.dumps(model))
    flags = ("--sequence-parallel", "--global-batch-size", "2")
    shared = run_distributed(_train, 2, _argv(tmp_path / "i2v_edp.json", i2v_setup["data_i2v"], *flags, iters=1, tp=2),
                             tp=2, timeout=240)
    redundant = run_distributed(_train, 2, _argv(i2v_setup["i2v"], i2v_setup["data_i2v"], *flags, iters=1, tp=2),
                                tp=2, timeout=240)
    assert shared[0] == shared[1] and redundant[0] == redundant[1]
    assert shared[0] == redundant[0]


def test_i2v_training_refuses_a_data_json_without_masks_and_the_feature_cache(i2v_setup, tmp_path):
    from mindspeed_mm_osp.config import ConfigError, load_data_config, load_model_config, validate_conditioning

    s = i2v_setup
    i2v, t2v = load_model_config(s["i2v"]), load_model_config(s["t2v"])
    masks, plain = load_data_config(s["data_i2v"]), load_data_config(s["data"])
    validate_conditioning(i2v, masks, model_file="i2v.json", data_file="data.json")
    with pytest.raises(ConfigError, match="data.json: dataset_param.mask_config: .*add a mask_config block"):
        validate_conditioning(i2v, plain, model_file="i2v.json", data_file="data.json")
    with pytest.raises(ConfigError, match="data.json: dataset_param.mask_config: given, but .*SparseUMMDiT"):
        validate_conditioning(t2v, masks, model_file="t2v.json", data_file="data.json")
    with pytest.raises(ConfigError, match="t2v.json: predictor.model_id: --i2v-loss-region generated needs"):
        validate_conditioning(t2v, plain, model_file="t2v.json", data_file="data.json", loss_region="generated")
    model = json.loads(s["i2v"].read_text())
    model["load_video_features"] = True
    (tmp_path / "cached.json").write_text(json.dumps(model))
    with pytest.raises(ConfigError, match="cached.json: load_video_features: .*reads clips online"):
        validate_conditioning(load_model_config(tmp_path / "cached.json"), masks, model_file=tmp_path / "cached.json",
                              data_file="data.json")
