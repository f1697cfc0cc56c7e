#!/usr/bin/env bash
# Every GPU benchmark of nclayers in one go, one JSON out; under 5 minutes on one H200.
#
#   bash benchmarks/gpu.sh DATA_DIR OUT_JSON
#
# DATA_DIR holds cifar-10-batches-py/. On a lent machine, where ../shared does not travel,
# carry the packed copy and unpack it first (see ../shared/tools/device_cifar.py):
#   python3 .device-data/device_cifar.py unpack .device-data/cifar10.npz /tmp/data
#   bash benchmarks/gpu.sh /tmp/data "$OUT/gpu.json"
#
# Steps, most important first, each under its own time limit and all within a global one
# (GPU_BUDGET seconds, default 290), so that a slow or failing step costs only itself:
#   env_check          `nclayers env --check`: decode, bf16, compile, reduce on each device
#   analyze_resnet18   benchmarks/analyze_overhead.py, ResNet18 width 64, batch 1000
#   imagenet           benchmarks/imagenet_pipeline.py on folders it generates here:
#                      nvJPEG FolderBatches vs torchvision ImageFolder + DataLoader (16
#                      workers); ResNet50 analysis over inference at K = 1000 in bf16
#   hf                 benchmarks/hf_overhead.py (causal LM next-token, classifier)
#   train_compile      `nclayers train`, ResNet18 width 64, batch 128, train.compile=true,
#                      2 epochs: the second epoch's img/s is the compiled speed
#   analyze_resnet152  benchmarks/analyze_overhead.py, ResNet152 width 64 (50 blocks)
#   probe              benchmarks/probe_speed.py (the lr grid and one lr vs inference, vs separate)
#   train_overhead     benchmarks/train_overhead.py (eager step vs plain loop, pipeline)
#   analyze_run        `nclayers analyze` of the checkpoint train_compile wrote
# bf16 autocast and channels_last on both sides of every ratio. Every step's log lands
# beside OUT_JSON (OUT_JSON minus .json, plus -logs/); the JSON holds each step's exit
# status and seconds, and "figures": per figure its value, its target (the README's and
# the benchmarks' docstrings') and "pass" (true, false, or null without a target or a
# value). Needs Python with the project's dependencies (torch with CUDA); the repo need
# not be installed. PYTHON=... picks the interpreter.
# GPU_SH_SMOKE=1 runs the same steps on the CPU with tiny sizes, with room for a busy CPU: a
# check of the script itself, not a benchmark (tests/test_gpu_sh.py runs it).
set -uo pipefail
if [ $# -ne 2 ]; then
  echo "usage: bash benchmarks/gpu.sh DATA_DIR OUT_JSON" >&2
  exit 2
fi
DATA=$(cd "$1" 2>/dev/null && pwd) || { echo "gpu.sh: no folder $1" >&2; exit 2; }
OUT_JSON=$(cd "$(dirname "$2")" 2>/dev/null && pwd)/$(basename "$2") || {
  echo "gpu.sh: the folder of $2 does not exist" >&2; exit 2; }
if [ ! -f "$DATA/cifar-10-batches-py/test_batch" ]; then
  echo "gpu.sh: $DATA holds no cifar-10-batches-py/test_batch" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET=${GPU_BUDGET:-290}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEVICE=cuda WIDTH=64 BATCH=1000 SIZES=() TRAIN_SIZES=() TRAIN_STEPS=() SLOW=1
IMAGENET=(--workers 16 --per-class 20 --k1000-per-class 2 --repeats 2 --analyze-passes 2)
HF=(--sequences 4096 --repeats 3) PROBE=(--samples 10000 --epochs 2)
if [ "${GPU_SH_SMOKE:-0}" = 1 ]; then
  SLOW=${GPU_SH_SLOW:-6} BUDGET=${GPU_BUDGET:-900}  # a check, not a race: room for a busy CPU
  DEVICE=cpu WIDTH=4 BATCH=100 SIZES=(--images 200 --repeats 1)
  TRAIN_SIZES=(data.train_subset=300 data.test_subset=200 analyze.batch_size=100)
  TRAIN_STEPS=(--images 300 --steps 2 --repeats 1 --workers 1)
  IMAGENET=(--workers 1 --per-class 1 --k1000-per-class 1 --repeats 1 --analyze-passes 1
            --max-images 20 --batch-size 250 --image-size 64)
  HF=(--sequences 32 --repeats 1 --layers 2 --hidden 64) PROBE=(--samples 256 --epochs 1)
else
  "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: torch sees no CUDA GPU')" || exit 2
fi
LOGS=${OUT_JSON%.json}-logs
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nclayers-gpu.XXXXXX")
mkdir -p "$LOGS"
: > "$WORK/steps.tsv"
START=$(date +%s)

# step NAME LIMIT COMMAND...: run under min(LIMIT, what is left of the budget)
step() {
  local name=$1 limit=$2 left rc t0 t1
  shift 2
  limit=$((limit * SLOW))
  left=$((START + BUDGET - $(date +%s)))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 5 ]; then
    printf '%s\t%s\t%s\n' "$name" skipped 0 >> "$WORK/steps.tsv"
    echo "== $name: skipped, the time budget is spent"
    return
  fi
  echo "== $name (limit ${limit} s)"
  t0=$(date +%s%N)
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  t1=$(date +%s%N)
  ms=$(((t1 - t0) / 1000000))
  printf '%s\t%s\t%d.%03d\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) >> "$WORK/steps.tsv"
  tail -n 6 "$LOGS/$name.log"
}

# The smoke run leaves out inductor's compile check (a minute of C++ on two shared cores;
# tests/test_gpu_paths.py and tests/test_env.py run it).
if [ "$DEVICE" = cpu ]; then ENV_DEVICES=(--device cpu --skip compile); else ENV_DEVICES=(); fi
step env_check 40 "$PYTHON" -m nclayers.cli env --check ${ENV_DEVICES[@]+"${ENV_DEVICES[@]}"}
step analyze_resnet18 30 "$PYTHON" benchmarks/analyze_overhead.py --device "$DEVICE" \
  --data-dir "$DATA" --model resnet18 --width "$WIDTH" --batch-size "$BATCH" ${SIZES[@]+"${SIZES[@]}"} \
  --json "$WORK/analyze_resnet18.json"
step imagenet 70 "$PYTHON" benchmarks/imagenet_pipeline.py --device "$DEVICE" "${IMAGENET[@]}" \
  --json "$WORK/imagenet.json"
step hf 30 "$PYTHON" benchmarks/hf_overhead.py --device "$DEVICE" "${HF[@]}" --json "$WORK/hf.json"
step train_compile 50 "$PYTHON" -m nclayers.cli train configs/resnet18-cifar10.yaml \
  "data.dir=$DATA" "device=$DEVICE" "model.width=$WIDTH" train.epochs=2 train.batch_size=128 \
  train.compile=true train.amp=true train.channels_last=true train.checkpoint_every=0 \
  train.tensorboard=false ${TRAIN_SIZES[@]+"${TRAIN_SIZES[@]}"} --out "$WORK/run" --quiet
step analyze_resnet152 40 "$PYTHON" benchmarks/analyze_overhead.py --device "$DEVICE" \
  --data-dir "$DATA" --model resnet152 --width "$WIDTH" --batch-size "$BATCH" ${SIZES[@]+"${SIZES[@]}"} \
  --json "$WORK/analyze_resnet152.json"
step probe 30 "$PYTHON" benchmarks/probe_speed.py --device "$DEVICE" --data-dir "$DATA" \
  "${PROBE[@]}" --json "$WORK/probe.json"
step train_overhead 25 "$PYTHON" benchmarks/train_overhead.py --device "$DEVICE" \
  --data-dir "$DATA" --width "$WIDTH" --batch-size 128 --workers 8 --repeats 3 \
  ${TRAIN_STEPS[@]+"${TRAIN_STEPS[@]}"} --json "$WORK/train_overhead.json"
step analyze_run 20 "$PYTHON" -m nclayers.cli analyze configs/resnet18-cifar10.yaml \
  "data.dir=$DATA" "device=$DEVICE" "model.width=$WIDTH" \
  "model.checkpoint=$WORK/run/checkpoint.pt" ${TRAIN_SIZES[@]+"${TRAIN_SIZES[@]}"} --out "$WORK/analyze" --quiet

"$PYTHON" - "$WORK" "$OUT_JSON" "$START" <<'PY'
import json
import sys
import time
from pathlib import Path

import torch

work, out, start = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    steps[name] = {"rc": rc, "seconds": float(seconds or 0)}
result = {
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    "torch": torch.__version__,
    "wall_seconds": time.time() - start,
    "steps": steps,
}
for name in ("analyze_resnet18", "analyze_resnet152", "train_overhead", "imagenet", "hf", "probe"):
    result[name] = load(work / f"{name}.json")
train = load(work / "run" / "train_summary.json")
if train:
    history = train.get("history") or []
    result["train_compile"] = {
        "img_per_s_by_epoch": [h["img_per_s"] for h in history],
        "epoch_seconds": [h["epoch_seconds"] for h in history],
        "test_acc": [h["test_acc"] for h in history],
        "img_per_s_compiled": history[-1]["img_per_s"] if len(history) > 1 else None,
        "train_seconds": train.get("train_seconds"),
    }
analysis = load(work / "analyze" / "summary.json")
if analysis:
    result["analyze_run"] = {k: analysis.get(k) for k in ("accuracy", "samples", "seconds")}

# (figure, step, keys into that step's JSON, target: "<= x", ">= x" or None)
FIGURES = [
    ("analyze_resnet18_over_inference", "analyze_resnet18", ["analyze_over_inference"], "<= 1.05"),
    ("analyze_resnet18_two_pass_over_analyze", "analyze_resnet18", ["two_pass_over_analyze"], ">= 1.8"),
    ("imagenet_decode_eval_over_torchvision", "imagenet", ["decode_over_torchvision", "eval", "ratio"], ">= 1.5"),
    ("imagenet_decode_probe_train_over_torchvision", "imagenet", ["decode_over_torchvision", "probe_train", "ratio"], ">= 1.5"),
    ("imagenet_analyze_over_inference_k1000", "imagenet", ["analyze_over_inference", "ratio"], "<= 1.05"),
    ("hf_lm_analyze_over_inference", "hf", ["lm_analyze_over_inference"], "<= 1.10"),
    ("hf_cls_analyze_over_inference", "hf", ["cls_analyze_over_inference"], "<= 1.05"),
    ("train_compile_img_per_s", "train_compile", ["img_per_s_compiled"], None),
    ("analyze_resnet152_over_inference", "analyze_resnet152", ["analyze_over_inference"], "<= 1.05"),
    ("analyze_resnet152_two_pass_over_analyze", "analyze_resnet152", ["two_pass_over_analyze"], ">= 1.8"),
    ("probe_grid_over_inference", "probe", ["grid_over_inference"], "<= 1.10"),
    ("probe_single_lr_over_inference", "probe", ["single_over_inference"], "<= 1.05"),
    ("probe_separate_over_joint", "probe", ["separate_over_joint"], ">= 6"),
    ("probe_cache_over_inference", "probe", ["cache_over_inference"], "<= 1.5"),
    ("train_step_over_plain", "train_overhead", ["step_over_plain"], "<= 1.05"),
    ("train_pipeline_speedup", "train_overhead", ["pipeline_speedup"], ">= 5"),
    ("train_eager_img_per_s", "train_overhead", ["images_per_s", "nclayers_step"], None),
]


def dig(value, keys):
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, (int, float)) else None


def verdict(value, target):
    if value is None or target is None:
        return None
    op, limit = target.split()
    return value <= float(limit) if op == "<=" else value >= float(limit)


env_step = steps.get("env_check", {})
figures = {"env_check_all_ok": {"value": env_step.get("rc") == "0", "target": "all ok",
                                "pass": env_step.get("rc") == "0"}}
for name, step_name, keys, target in FIGURES:
    value = dig(result.get(step_name), keys)
    figures[name] = {"value": value, "target": target, "pass": verdict(value, target),
                     "step": step_name, "rc": steps.get(step_name, {}).get("rc")}
result["figures"] = figures
out.write_text(json.dumps(result, indent=2))
for name, f in figures.items():
    state = {True: "pass", False: "FAIL", None: "-"}[f["pass"]]
    print(f"{name:<46} {f['value']!s:<22} {f['target'] or '':<8} {state}")
print(f"wrote {out}")
PY
echo "logs: $LOGS; run folders: $WORK"
