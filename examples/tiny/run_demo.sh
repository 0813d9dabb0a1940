#!/usr/bin/env bash
# The embedded end-to-end demo on CPU (a few minutes on 2 cores), everything under demo_out/:
#   1. synthetic videos/images with captions; tiny random-weight WF-VAE, T5 and CLIP folders
#   2. train the tiny WF-VAE (data parallel on 2 CPU processes, on every synthetic file, the broken ones included)
#      and put its EMA weights where the model JSON expects the VAE; its reconstruction PSNR of a training clip is
#      printed before and after; its latents' per-channel mean and spread go into demo copies of the model and
#      inference JSONs (demo_out/*.json)
#   3. train the tiny SparseUMMDiT on that VAE's latents of the synthetic clips with TP=2 + sequence parallel,
#      save a torch_dist checkpoint, stop
#   4. resume that checkpoint at another layout (TP=1 x DP=2: it reshards) and train to the end
#   5. merge the checkpoint into one weights file, taking the EMA weights
#   6. generate a video from a training caption with the merged EMA weights
#   7. one PNG side by side: training clip | VAE reconstruction, and the generated sample
set -euo pipefail
source "$(dirname "$0")/demo_env.sh"
ITERS=${ITERS:-150}    # predictor iterations of 4 clips each (8 clips: 2 iterations per pass over the data)
FIRST=${FIRST:-6}      # of which at TP=2 + SP, before the layout changes
VAE_ITERS=${VAE_ITERS:-300}  # 2 clips each: under a minute on 2 idle CPU cores
CLIP="$OUT/data/set3/r000.mp4"
rm -rf "$OUT/ckpt" "$OUT/merged" "$OUT/samples" "$OUT/vae_ckpt" "$OUT/recon_before" "$OUT/recon_after" \
  "$OUT/model.json" "$OUT/inference.json"

echo "== 1/7 synthetic dataset and tiny models"
$PY -m mindspeed_mm_osp.tools.make_synthetic_dataset "$OUT/data" --overwrite
$PY -m mindspeed_mm_osp.tools.make_tiny_models "$OUT/models" --overwrite

# PSNR (dB) of the VAE that examples/tiny/model.json names, reconstructing $CLIP (side by side video in $1)
recon_psnr() {
  $PY -m mindspeed_mm_osp.tools.reconstruct_video --model-config examples/tiny/model.json --data "$CLIP" \
    --num-frames 17 --size 64 128 --out "$1" | awk '$1 == "r000.mp4" {print $2}'
}
VAE_ARGS="--mm-data examples/tiny/vae_data.json --mm-model examples/tiny/vae_model.json \
  --micro-batch-size 1 --global-batch-size 2 --train-iters $VAE_ITERS \
  --lr 2e-3 --lr-warmup-iters 5 --lr-decay-style cosine --min-lr 1e-4 --weight-decay 0 \
  --adam-beta1 0.5 --adam-beta2 0.9 --ema-decay 0.9 --seed 1234 --log-interval 25 \
  --save $OUT/vae_ckpt --save-interval $VAE_ITERS"

echo "== 2/7 train the tiny WF-VAE ($VAE_ITERS iterations, DP=2 on 2 CPU ranks)"
BEFORE=$(recon_psnr "$OUT/recon_before")
$TORCHRUN --standalone --nproc_per_node 2 pretrain.py $VAE_ARGS
cp "$OUT/vae_ckpt/merged.ckpt" "$OUT/models/vae/merged.ckpt"  # the EMA, in the released layout
AFTER=$(recon_psnr "$OUT/recon_after")
echo "tiny WF-VAE reconstruction PSNR of $CLIP: $BEFORE dB before training, $AFTER dB after"

# Per-channel mean and standard deviation of the trained VAE's posterior means over training-like clips (every
# start frame 0..39 of the synthetic pattern, 17 frames, 64x128) -> demo copies of the model and inference JSONs
# with ae.shift = mean and ae.scale = 1/std, so the predictor's targets are unit-scale (docs/vae_training.md)
$PY - "$OUT" <<'PY'
import sys
import numpy as np, torch
from mindspeed_mm_osp.tools.reconstruct_video import load_ae_config
from mindspeed_mm_osp.config import read_json
from mindspeed_mm_osp.inference.video_io import write_json_atomic
from mindspeed_mm_osp.tools.make_synthetic_dataset import frame_pixels
from mindspeed_mm_osp.models.ae import VideoAutoencoder

out = sys.argv[1]
vae = VideoAutoencoder(load_ae_config("examples/tiny/model.json"))
clips = [np.stack([frame_pixels(k0 + i, 64, 128) for i in range(17)]) for k0 in range(40)]
video = torch.from_numpy(np.stack(clips)).float().div(127.5).sub(1).permute(0, 4, 1, 2, 3)
z = torch.cat([vae.encode_posterior(v)[0] for v in video.split(1)])
mean, std = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))
for name in ("model.json", "inference.json"):
    cfg = read_json(f"examples/tiny/{name}")
    cfg["ae"]["shift"], cfg["ae"]["scale"] = [round(float(m), 4) for m in mean], [round(float(1 / s), 4) for s in std]
    write_json_atomic(f"{out}/{name}", cfg)
print("latent mean", [round(float(m), 3) for m in mean], "std", [round(float(s), 3) for s in std])
PY

TRAIN_ARGS="--mm-data examples/tiny/clips_data.json --mm-model $OUT/model.json \
  --use-distributed-optimizer --micro-batch-size 2 --global-batch-size 4 --train-epochs $((ITERS / 2)) \
  --lr 2e-3 --lr-warmup-iters 4 --lr-decay-style cosine --min-lr 1e-4 --weight-decay 1e-4 --clip-grad 1.0 \
  --ema-decay 0.99 --seed 1234 --log-interval 5 --save $OUT/ckpt --ckpt-format torch_dist \
  --mm-valid-data examples/tiny/clips_data.json --eval-interval $ITERS --eval-iters 2 \
  --validation-prompts examples/tiny/validation_prompts.txt --validation-interval $ITERS"

echo "== 3/7 train the predictor on the VAE's latents (TP=2 + SP, 2 CPU ranks), save at iteration $FIRST and stop"
$TORCHRUN --standalone --nproc_per_node 2 pretrain.py $TRAIN_ARGS --tensor-model-parallel-size 2 --sequence-parallel \
  --save-interval $FIRST --exit-interval $FIRST

echo "== 4/7 resume from $OUT/ckpt at TP=1 x DP=2 (the torch_dist checkpoint reshards) and train to iteration $ITERS"
$TORCHRUN --standalone --nproc_per_node 2 pretrain.py $TRAIN_ARGS --save-interval $ITERS --load $OUT/ckpt

echo "== 5/7 merge the checkpoint into one weights file (EMA weights)"
$PY convert_mm_to_ckpt.py --load_dir $OUT/ckpt --save_dir $OUT/merged --ema

echo "== 6/7 generate"
$PY inference.py --config $OUT/inference.json --predictor-weights $OUT/merged/model_ema.safetensors \
  --save-path $OUT/samples --prompt "random clip number 0" --num-inference-steps 24 --guidance-scale 1
ls -l $OUT/samples

echo "== 7/7 side by side: $OUT/compare.png"
SAMPLE=$(ls "$OUT"/samples/*.mp4 | head -n 1)
$PY -m mindspeed_mm_osp.tools.compare_frames "$OUT/compare.png" \
  --video "training clip | VAE reconstruction=$OUT/recon_after/r000.mp4" --video "generated sample=$SAMPLE"
echo "tiny WF-VAE reconstruction PSNR: $BEFORE dB before training, $AFTER dB after"
echo "demo finished: videos in $OUT/samples, checkpoints in $OUT/ckpt and $OUT/vae_ckpt, merged weights in $OUT/merged"
