"""The training loop on real tiny models and real videos: resume equality, TP/SP invariance, skips."""

import pytest
import torch

from mindspeed_mm_osp.testing import run_distributed
from helpers import final_weights, training_argv

pytestmark = pytest.mark.slow
# `_velocity_error_ratio` after the demo's 32 iterations: 0.82 measured; 1.36 when trained on the negated target
RATIO_LIMIT = 0.95


def _train(rank, world_size, argv, save_weights_to=None):
    import torch.distributed as dist

    from mindspeed_mm_osp.training.arguments import parse_args
    from mindspeed_mm_osp.training.trainer import pretrain

    args = parse_args(argv, world_size=world_size)
    result = pretrain(args)
    return {"losses": result.losses, "iteration": result.iteration, "consumed": result.consumed_train_samples,
            "skipped": result.skipped_iterations, "rank": dist.get_rank()}


@pytest.mark.parametrize("world_size, tp, extra", [
    (1, 1, []),
    (2, 1, ["--use-distributed-optimizer"]),
    (2, 2, ["--sequence-parallel", "--use-distributed-optimizer"]),
], ids=["single", "dp2-distopt", "tp2-sp"])
def test_resume_equals_uninterrupted(tiny_assets, tmp_path, world_size, tp, extra):
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    full = run_distributed(_train, world_size, training_argv(tiny_assets, "--save", str(straight), *extra, tp=tp),
                           tp=tp, timeout=240)
    first = run_distributed(_train, world_size, training_argv(tiny_assets, "--save", str(split), "--save-interval",
                                                              "3", "--exit-interval", "3", *extra, tp=tp),
                            tp=tp, timeout=240)
    second = run_distributed(_train, world_size, training_argv(tiny_assets, "--save", str(split), "--load", str(split),
                                                               *extra, tp=tp), tp=tp, timeout=240)
    assert first[0]["iteration"] == 3 and second[0]["iteration"] == 6
    assert first[0]["losses"] + second[0]["losses"] == full[0]["losses"]
    it_a, model_a, ema_a = final_weights(straight)
    it_b, model_b, ema_b = final_weights(split)
    assert it_a == it_b == 6
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key


def test_tp2_sp_matches_tp1_loss_curve(tiny_assets, tmp_path):
    tp1 = run_distributed(_train, 1, training_argv(tiny_assets, iters=5), tp=1, timeout=240)
    tp2 = run_distributed(_train, 2, training_argv(tiny_assets, "--sequence-parallel", iters=5, tp=2), tp=2,
                          timeout=240)
    assert tp2[0]["losses"] == tp2[1]["losses"]
    torch.testing.assert_close(torch.tensor(tp2[0]["losses"]), torch.tensor(tp1[0]["losses"]), rtol=1e-4, atol=1e-5)


def test_nonfinite_gradients_are_skipped_then_training_stops(tiny_assets, tmp_path):
    """NaN/Inf gradients at iterations 2-4 are skipped (nothing changes); the third in a row stops training after
    saving, and the saved state equals a run that stopped after iteration 1."""
    save = tmp_path / "faulty"
    with pytest.raises(Exception, match="consecutive iterations skipped"):
        run_distributed(_train, 2, training_argv(tiny_assets, "--save", str(save), "--use-distributed-optimizer",
                                                 "--inject-nonfinite-grad", "2:nan,3:inf,4:nan",
                                                 "--max-consecutive-skips", "3", iters=6), tp=1, timeout=240)
    reference = tmp_path / "one_step"
    run_distributed(_train, 2, training_argv(tiny_assets, "--save", str(reference), "--use-distributed-optimizer",
                                             iters=1), tp=1, timeout=240)
    it, model, ema = final_weights(save)
    it_ref, model_ref, ema_ref = final_weights(reference)
    assert (it, it_ref) == (4, 1)
    for key in model_ref:
        assert torch.equal(model[key], model_ref[key]), key
    for key in ema_ref:
        assert torch.equal(ema[key], ema_ref[key]), key
    from mindspeed_mm_osp.checkpoint.layout import model_file

    opt = torch.load(model_file(save, 4, 0), map_location="cpu", weights_only=False)["optimizer"]["state"]
    opt_ref = torch.load(model_file(reference, 1, 0), map_location="cpu", weights_only=False)["optimizer"]["state"]
    for name, state in opt_ref.items():
        for k, v in state.items():
            same = torch.equal(opt[name][k], v) if torch.is_tensor(v) else opt[name][k] == v
            assert same, (name, k)


def test_encoder_dp_resume_equals_uninterrupted(tiny_assets, tmp_path):
    """enable_encoder_dp: TP peers encode different micro-batches and share them; a resume in the middle of a
    fetch round (iteration 3 of rounds of 2) reproduces the uninterrupted run."""
    import json

    cfg = json.loads(tiny_assets["model_json"].read_text())
    cfg["enable_encoder_dp"] = True
    model_json = tmp_path / "model_encoder_dp.json"
    model_json.write_text(json.dumps(cfg))
    assets = {**tiny_assets, "model_json": model_json}
    extra = ["--sequence-parallel"]
    straight = run_distributed(_train, 2, training_argv(assets, "--save", str(tmp_path / "a"), *extra, iters=5, tp=2),
                               tp=2, timeout=240)
    run_distributed(_train, 2, training_argv(assets, "--save", str(tmp_path / "b"), "--save-interval", "3",
                                             "--exit-interval", "3", *extra, iters=5, tp=2), tp=2, timeout=240)
    resumed = run_distributed(_train, 2, training_argv(assets, "--save", str(tmp_path / "b"), "--load",
                                                       str(tmp_path / "b"), *extra, iters=5, tp=2), tp=2, timeout=240)
    assert straight[0]["losses"][3:] == resumed[0]["losses"]
    assert straight[0]["losses"] == straight[1]["losses"]
    _, model_a, _ = final_weights(tmp_path / "a")
    _, model_b, _ = final_weights(tmp_path / "b")
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key


def _extract(rank, world_size, data_json, model_json, out):
    from mindspeed_mm_osp.config import load_data_config, load_model_config
    from mindspeed_mm_osp.features import extract_features

    extract_features(load_data_config(data_json), load_model_config(model_json), out, shard_size=4, progress=False)


def test_training_from_feature_cache_equals_online(tmp_path):
    """pretrain.py with load_video_features + load_text_features reproduces the online loss curve."""
    import json

    from mindspeed_mm_osp.testing import make_tiny_setup

    setup = make_tiny_setup(tmp_path / "setup")
    run_distributed(_extract, 1, str(setup.data_json), str(setup.model_json), str(setup.cache_dir), timeout=240)
    cached_cfg = json.loads(setup.model_json.read_text())
    cached_cfg.update(load_video_features=True, load_text_features=True)
    cached_json = tmp_path / "model_cached.json"
    cached_json.write_text(json.dumps(cached_cfg))
    online = {"data_json": setup.data_json, "model_json": setup.model_json}
    cached = {"data_json": setup.data_json, "model_json": cached_json}
    a = run_distributed(_train, 1, training_argv(online, iters=4), tp=1, timeout=240)
    b = run_distributed(_train, 1, training_argv(cached, iters=4), tp=1, timeout=240)
    torch.testing.assert_close(torch.tensor(b[0]["losses"]), torch.tensor(a[0]["losses"]), rtol=1e-4, atol=1e-5)


def _velocity_error_ratio(trainer, sigmas=(0.3, 0.5, 0.7, 0.9)) -> float:
    """Masked MSE of the trained predictor against the velocity noise - x0, noised here by hand at fixed sigmas on
    the first micro-batches of the data, over the MSE of predicting zero. Below 1 only if the model learnt the
    velocity; a model taught a negated or swapped target scores above 1."""
    from mindspeed_mm_osp.training.batches import build_train_stream
    from mindspeed_mm_osp.training.step import keyed_generator, model_inputs

    stream, _ = build_train_stream(trainer.data_plan, trainer.data_cfg, trainer.model_cfg, trainer.encoders, trainer.dims, micro_batch_size=1,
                                   global_batch_size=1, consumed_samples=0, seed=trainer.args.seed)
    err = zero = 0.0
    with torch.no_grad():
        for i, sigma in enumerate(sigmas):
            enc = stream.next()
            noise = torch.randn(enc.latents.shape, generator=keyed_generator("probe", i))
            x_t = sigma * noise + (1 - sigma) * enc.latents
            timestep = torch.full((x_t.shape[0],), 1000.0 * sigma)
            pred = trainer.ddp(**model_inputs(enc, x_t, timestep, trainer.precision.predictor)).float()
            mask = enc.latent_mask[:, None].expand_as(pred)
            err += float(((pred - (noise - enc.latents)) ** 2 * mask).sum())
            zero += float(((noise - enc.latents) ** 2 * mask).sum())
    return err / zero


def _train_and_probe(rank, world_size, argv):
    from mindspeed_mm_osp.training.arguments import parse_args
    from mindspeed_mm_osp.training.trainer import Trainer

    trainer = Trainer(parse_args(argv, world_size=world_size))
    losses = trainer.fit().losses
    return losses, _velocity_error_ratio(trainer)


def test_loss_decreases_on_the_tiny_demo(tiny_assets):
    """The demo's setting (TP=2 + SP, distributed optimizer, warm-up + cosine) learns: the mean loss of the last
    8 of 32 iterations is clearly below that of the first 8, and what it learnt is the velocity noise - x0 (its
    error against that target, computed here by hand, is clearly below the error of predicting zero; a falling
    loss alone would also follow a negated target)."""
    argv = training_argv(tiny_assets, "--sequence-parallel", "--use-distributed-optimizer", "--lr", "2e-4",
                         "--lr-warmup-iters", "4", "--lr-decay-style", "cosine", "--min-lr", "2e-5", iters=32, tp=2)
    (losses, ratio), (_, ratio_peer) = run_distributed(_train_and_probe, 2, argv, tp=2, timeout=400)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.85 * first, (first, last)
    assert ratio == ratio_peer
    assert ratio < RATIO_LIMIT, ratio
