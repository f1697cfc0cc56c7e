#!/usr/bin/env bash
# One epoch of CIFAR ResNet18 (width 64) on CIFAR-10 with the paper recipe (SGD lr 0.1,
# momentum 0.9, batch 128, crop + flip) on one NVIDIA GPU, bf16 autocast and
# channels_last; prints images/second and the wall time including start-up.
#
#   bash benchmarks/gpu_train.sh
#   DATA=/path/with/cifar-10-batches-py PYTHON=python3 bash benchmarks/gpu_train.sh
#
# Needs a Python with the project's dependencies (torch with CUDA, torchvision, timm,
# PyYAML, tqdm, numpy, scikit-learn, matplotlib); the repo need not be installed.
# Data: $DATA, else ../shared/data, else shared/data (relative to the repo root).
# Expected: a few seconds of training on a recent GPU; the whole script well under 10 min.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -z "${DATA:-}" ]; then
  for d in ../shared/data shared/data; do
    if [ -f "$d/cifar-10-batches-py/test_batch" ]; then DATA=$d; break; fi
  done
fi
if [ -z "${DATA:-}" ]; then
  echo "gpu_train.sh: no CIFAR-10 in ../shared/data or shared/data; set DATA=folder holding cifar-10-batches-py/" >&2
  exit 2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_train.sh: torch sees no CUDA GPU')"
OUT=$(mktemp -d "${TMPDIR:-/tmp}/nclayers-gpu-train.XXXXXX")

start=$(date +%s.%N)
timeout 540 "$PYTHON" -m nclayers.cli train configs/resnet18-cifar10.yaml \
  "data.dir=$DATA" device=cuda model.width=64 train.epochs=1 train.batch_size=128 \
  train.amp=true train.channels_last=true train.checkpoint_every=0 "out=$OUT"
end=$(date +%s.%N)

"$PYTHON" - "$OUT/train_summary.json" "$start" "$end" <<'PY'
import json
import sys

summary = json.load(open(sys.argv[1]))
epoch = summary["final"]
wall = float(sys.argv[3]) - float(sys.argv[2])
print(f"ResNet18 width 64, CIFAR-10, 1 epoch, batch 128, bf16 + channels_last, {summary['device']}")
print(f"training: {epoch['img_per_s']:.0f} images/s")
print(f"epoch with the 10,000-image test pass: {epoch['epoch_seconds']:.1f} s; "
      f"test accuracy {epoch['test_acc']:.4f}")
print(f"wall time including start-up and data loading: {wall:.1f} s")
PY
echo "run folder: $OUT"
