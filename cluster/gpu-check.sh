#!/usr/bin/env bash
# The GPU check of issues 4 and 11, as one script for a machine with a GPU and torch (Ray optional)
# (the device machine): run from the repository root. Prints JSON lines: a plain forward +
# backward of the step's T*80 images, then amfs and maml meta-training tasks/s on
# mini-ImageNet-sized inputs (84x84x3, Conv-4 width 32, 5-way 1-shot, 15 queries, T=32),
# in fp32 and in bf16 autocast; with Ray, two workers on the one GPU for each exchange.
set -euo pipefail
export PYTHONPATH="${PYTHONPATH:-}:$PWD" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
common=(data.image_size=84 data.channels=3 model.width=32 data.ways=5 data.shots=1 data.queries=15
        train.meta_batch=32 train.device=cuda)
for precision in fp32 bf16; do
  python3 -m amfs_dist bench train --methods amfs,maml --steps 5 "${common[@]}" train.precision=$precision
done
# a short end-to-end run on the GPU: training, validation and the test evaluation
python3 -m amfs_dist train --no-progress --out "${OUT:-/tmp}/gpu-run" train.device=cuda train.steps=50 eval.episodes=200
# two shard workers sharing the GPU (dist.gpus_per_worker=0.5), once per exchange: tasks/s, the
# bytes through the driver and per worker, and the step split (needs Ray on this machine)
if python3 -c "import ray" 2>/dev/null; then
  RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" python3 -m amfs_dist bench distributed --workers "" \
    --exchange-workers 0 --grid-workers 2 --grid-backbones conv4,resnet12 --grid-meta-batch 32 \
    --grid-queries 15 --grid-steps 5 --grid-warmup 2 "${common[@]}" dist.gpus_per_worker=0.5
else
  echo '{"skipped": "two-worker runs: Ray is not installed here"}'
fi
