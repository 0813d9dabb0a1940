"""WF-VAE training through pretrain.py on the synthetic clips: it learns, resumes bit-exactly (with the
discriminator), DP=2 equals DP=1 with twice the micro-batch, the EMA export loads strictly, and a discriminator
that starts after the run is never built."""

import json

import pytest
import torch

from mindspeed_mm_osp.testing import run_distributed

# Clips of 9 frames at 32x64 (latent 2x4x8); the random videos of the synthetic set only.
CLIP = {"num_frames": 9, "max_height": 32, "max_width": 64, "max_hxw": 2048, "min_hxw": 2048,
        "min_samples_per_shape_factor": 0}
# 50 iterations of 4 clips, cosine LR from 2e-3: reconstruction PSNR 10.6 -> 17.6 dB, last/first losses 0.55 measured
LEARN = ["--micro-batch-size", "4", "--global-batch-size", "4", "--lr", "2e-3", "--lr-warmup-iters", "5",
         "--lr-decay-style", "cosine", "--min-lr", "1e-4"]


@pytest.fixture(scope="module")
def vae_assets(tiny_assets, tmp_path_factory):
    from mindspeed_mm_osp.models.ae import tiny_ae_config_dict
    from mindspeed_mm_osp.tools.make_synthetic_dataset import data_json_dict

    root = tmp_path_factory.mktemp("vae")
    set3 = tiny_assets["data"].root / "set3"
    (root / "data.txt").write_text(f"{set3},{set3 / 'anno.json'}\n")
    pipe = [{"trans_type": "ToTensorVideo"}, {"trans_type": "CenterCropResizeVideo",
                                              "param": {"size": [32, 64], "interpolation_mode": "bicubic"}},
            {"trans_type": "ae_norm"}]
    data = data_json_dict(root / "data.txt", **CLIP, train_pipeline={"video": pipe, "image": pipe})
    data["dataset_param"]["enable_text_preprocess"] = False
    data["dataloader_param"]["collate_param"]["num_frames"] = 9
    (root / "data.json").write_text(json.dumps(data))
    return {"root": root, "data": root / "data.json", "ae": tiny_ae_config_dict()}


def model_json(assets, name: str, **loss) -> str:
    path = assets["root"] / f"{name}.json"
    path.write_text(json.dumps({"train_autoencoder": True, "ae": assets["ae"],
                                "loss": {"discriminator_start": 1000, **loss}}))
    return str(path)


def argv(assets, model: str, *extra, iters=6, mbs=1, gbs=1):
    return ["--mm-data", str(assets["data"]), "--mm-model", model, "--micro-batch-size", str(mbs),
            "--global-batch-size", str(gbs), "--train-iters", str(iters), "--lr", "1e-3", "--weight-decay", "0",
            "--adam-beta1", "0.5", "--adam-beta2", "0.9", "--ema-decay", "0.9", "--seed", "3", "--log-interval",
            "1", *extra]


def _train(rank, world_size, args_list, eval_clips=0):
    """Run the VAE trainer; with `eval_clips`, also the reconstruction PSNR before and after on fixed clips."""
    from mindspeed_mm_osp.training.arguments import parse_args
    from mindspeed_mm_osp.training.vae_data import build_clip_loader, reconstruction_psnr
    from mindspeed_mm_osp.training.vae_trainer import VAETrainer

    trainer = VAETrainer(parse_args(args_list, world_size=world_size))
    build_data, seen = trainer.build_data, {}

    def build_data_and_measure():
        build_data()
        if eval_clips:
            loader, _ = build_clip_loader(trainer.data_cfg, trainer.dims, micro_batch_size=1, global_batch_size=1,
                                          consumed_samples=0, seed=99, train_iters=1)
            it = iter(loader)
            seen["clips"] = [next(it).video for _ in range(eval_clips)]
            seen["before"] = reconstruction_psnr(trainer.vae, seen["clips"])

    trainer.build_data = build_data_and_measure
    train_step = trainer.train_step

    def train_step_keeping_first_grads():
        step = train_step()
        seen.setdefault("norms", []).append(step.clip.grad_norm)  # before clipping
        if "grads" not in seen:  # the first iteration's DP-reduced (and clipped) gradients
            seen["grads"] = {k: p.main_grad.clone() for k, p in trainer.vae.named_parameters() if p.requires_grad}
        return step

    trainer.train_step = train_step_keeping_first_grads
    result = trainer.fit()
    if eval_clips:
        seen["after"] = reconstruction_psnr(trainer.vae, seen.pop("clips"))
    gan = trainer.gan
    return {"losses": result.losses, "iteration": result.iteration, "skipped": result.skipped_iterations,
            "psnr": {k: seen[k] for k in ("before", "after") if k in seen}, "gan": gan is not None,
            "weights": {k: v.clone() for k, v in trainer.vae.state_dict().items()},
            "disc": {k: v.clone() for k, v in gan.ddp.module.state_dict().items()} if gan else None,
            "grads": seen.get("grads"), "grad_norms": seen.get("norms")}


@pytest.mark.slow
def test_loss_falls_and_psnr_rises_6db(vae_assets, tmp_path):
    out = run_distributed(_train, 1, argv(vae_assets, model_json(vae_assets, "learn"), *LEARN, iters=50), 4,
                          timeout=600)[0]
    losses = out["losses"]
    assert sum(losses[-10:]) < 0.75 * sum(losses[:10])
    assert out["psnr"]["after"] >= out["psnr"]["before"] + 6.0, out["psnr"]


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_resume_3_plus_3_equals_6_with_discriminator(vae_assets, tmp_path):
    from mindspeed_mm_osp.models.ae import WFVAE, load_wfvae_checkpoint
    from mindspeed_mm_osp.config.ae import AEConfig
    from mindspeed_mm_osp.config.loader import from_dict
    from helpers import final_weights

    model = model_json(vae_assets, "gan", discriminator_start=2, discriminator_channels=4, discriminator_layers=2)
    straight, split = tmp_path / "straight", tmp_path / "split"
    full = run_distributed(_train, 1, argv(vae_assets, model, "--save", str(straight)), timeout=300)[0]
    first = run_distributed(_train, 1, argv(vae_assets, model, "--save", str(split), "--save-interval", "3",
                                            "--exit-interval", "3"), timeout=300)[0]
    second = run_distributed(_train, 1, argv(vae_assets, model, "--save", str(split), "--load", str(split)),
                             timeout=300)[0]
    assert full["gan"] and (split / "discriminator").is_dir()
    assert first["iteration"] == 3 and second["iteration"] == 6
    assert first["losses"] + second["losses"] == full["losses"]
    _same(full["weights"], second["weights"])
    _same(full["disc"], second["disc"])
    _, _, ema_a = final_weights(straight)
    _, _, ema_b = final_weights(split)
    _same(ema_a, ema_b)
    # The release-layout export holds that EMA and loads strictly through the VAE loader.
    vae = WFVAE(from_dict(AEConfig, vae_assets["ae"], path="ae"))
    assert load_wfvae_checkpoint(vae, split / "merged.ckpt").source == "ema_state_dict"
    for name, p in vae.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), ema_b[name]), name
    # So does the converter's EMA export of the training checkpoint.
    from mindspeed_mm_osp.checkpoint.convert import main as convert

    convert(["--load_dir", str(split), "--save_dir", str(tmp_path / "merged"), "--ema"])
    vae = WFVAE(from_dict(AEConfig, vae_assets["ae"], path="ae"))
    load_wfvae_checkpoint(vae, tmp_path / "merged" / "model_ema.safetensors")
    assert all(torch.equal(p.detach(), ema_b[n]) for n, p in vae.named_parameters() if p.requires_grad)


# Adam with an epsilon far above the clipped gradients' elements (|g| < 0.05) steps lr * g: linear in the gradient.
# With the default 1e-8 its first steps move every weight by about +-lr whatever its gradient's size, so a near-zero
# gradient that differs in its last bits moves a weight by up to 2 lr: first-iteration losses that agree to 1e-7 and
# gradients to 1e-5 (float32 summation order) became a third loss 1.5e-5 apart. With this setting: <= 4e-7.
LINEAR_ADAM = ["--adam-eps", "1", "--lr", "0.1"]


@pytest.mark.slow
def test_dp2_equals_dp1_with_twice_the_micro_batch(vae_assets):
    model = model_json(vae_assets, "dp")
    one = run_distributed(_train, 1, argv(vae_assets, model, *LINEAR_ADAM, iters=3, mbs=2, gbs=2), timeout=300)[0]
    two = run_distributed(_train, 2, argv(vae_assets, model, *LINEAR_ADAM, iters=3, mbs=1, gbs=2), timeout=300)
    assert two[0]["losses"] == two[1]["losses"]
    _same(two[0]["weights"], two[1]["weights"])
    assert two[0]["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=0)
    # The norm before clipping: clipping to 1 would hide a gradient scaled alike on every rank.
    assert two[0]["grad_norms"][0] == pytest.approx(one["grad_norms"][0], rel=1e-5, abs=0)
    scale = max(float(g.abs().max()) for g in one["grads"].values())
    for key, value in one["grads"].items():
        torch.testing.assert_close(two[0]["grads"][key], value, rtol=1e-5, atol=1e-5 * scale, msg=key)
    for key, value in one["weights"].items():  # weights of order 1, moved by up to 6e-3 in the three steps
        torch.testing.assert_close(two[0]["weights"][key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_discriminator_start_beyond_the_run_builds_nothing(vae_assets, tmp_path):
    model = model_json(vae_assets, "late", discriminator_start=100)
    out = run_distributed(_train, 1, argv(vae_assets, model, "--save", str(tmp_path), iters=2), timeout=300)[0]
    assert out["gan"] is False and out["iteration"] == 2
    assert not (tmp_path / "discriminator").exists()


def test_nonfinite_gradient_step_is_skipped(vae_assets):
    out = run_distributed(_train, 1, argv(vae_assets, model_json(vae_assets, "nan"), "--inject-nonfinite-grad",
                                          "2:nan", iters=3), timeout=300)[0]
    assert out["iteration"] == 3 and out["skipped"] == 1
