"""The ImageNet input pipeline and the K = 1000 analysis, as ratios measured in one run.

    python benchmarks/imagenet_pipeline.py --json bench_imagenet.json
    python benchmarks/imagenet_pipeline.py --only decode --workers 1 --json bench_w1.json
    python benchmarks/imagenet_pipeline.py --device cuda --folder /datasets/imagenet \\
        --k1000 /datasets/imagenet --json bench_imagenet_cuda.json

Folders: `--folder DIR` (ImageFolder layout, train/ and val/; at most `--max-images`
class-balanced images of each split are read, the same on both sides) and `--k1000 DIR`
(real ImageNet: the analysis is then a pass over its 50,000 validation images), else
generated in a temporary folder: digits upscaled to about ImageNet's sizes (400 px wide,
aspect ratios 3/4 to 4/3, with grain so they decode like photographs), and a 1,000-class
folder of tiny images for the analysis. Every figure is measured twice in the same run:
wall-clock time, and CPU time (this process and its DataLoader workers, which are joined
at the end of each pass), because on a shared machine the wall clock also measures the
neighbours.
Prints and writes:

  decode_over_torchvision   images/s of nclayers' FolderBatches over torchvision's
                            ImageFolder + DataLoader (PIL decoding, Resize/CenterCrop or
                            RandomResizedCrop/flip, ToTensor, Normalize), the same workers,
                            batch size and device, batches moved to the device on both
                            sides: "eval" (val/, evaluation transform) and "probe_train"
                            (train/, probe-training augmentation); "ratio" (wall) and
                            "cpu_ratio" (images per CPU second)      target >= 1.5 on CPU
  analyze_over_inference    nclayers.analyze of resnet50_in1k (all 16 blocks, K = 1000,
                            NCC against reference means, the 1,000-class folder's val/)
                            over plain inference of the same model on the same
                            FolderBatches, same autocast (bf16 on CUDA unless --no-amp, none
                            on the CPU). Measured on this run's images ("ratio",
                            "cpu_ratio") and split into the pass and the end-of-pass metric
                            computation (NC1, NC2 of every block from that pass's own
                            statistics, once per pass), then extrapolated to ImageNet's
                            50,000 validation images ("ratio_50k", "cpu_ratio_50k": pass
                            costs scaled by 50,000 / n, the end-of-pass cost added once)
                                                                      target <= 1.05;
                            with --profile (CPU) also "profiled" and "profiled_50k": the
                            operators analyze adds, at their mean self CPU time
                            (benchmarks/profiled.py), the end of pass's operators counted
                            once in the 50k figure; figures neighbours on a shared
                            machine hardly move
                            "passes": every pass's wall and CPU seconds and page faults
                            (this process's), in run order
  stats_memory_mb           the statistics' device memory per block (K x D float64 sums
                            per labels view, and the shift), and their total

Each decoding variant runs `--repeats` times, interleaved, and the median counts; the two
sides of the analysis ratio run `--analyze-repeats` times in ABBA order (inference,
analyze, analyze, inference, ...) and their means count: on a shared machine the same
pass takes longer or shorter as the run goes on (the JSON's "passes" show it), which a
fixed order charges to the side that runs second.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

import nclayers
from nclayers.data import FolderBatches, balanced_subset
from nclayers.data.folderbatches import default_workers
from nclayers.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, load_folder_split
from nclayers.data.make_folder import make_image_folder, make_k1000_folder
from nclayers.metrics import BlockStats, LabelViews, collapse_metrics
from nclayers.models import build_model, find_blocks
from nclayers.runtime import autocast
from nclayers.taps import probe_shapes

# benchmarks/profiled.py, beside this script
from profiled import added_time, operator_times, self_time

VALIDATION_IMAGES = 50_000  # ImageNet's validation split, what analyze measures


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the DataLoader
    workers of both sides end, and are joined, with each pass)."""
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


def page_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, sync) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds, result) of fn()."""
    sync()
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    sync()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def torchvision_loader(root: Path, split: str, train: bool, batch: int, workers: int,
                       keep: torch.Tensor | None = None):  # fmt: skip
    """torchvision's ImageFolder + DataLoader; `keep`: positions of the samples to read
    (ImageFolder lists the files in nclayers' order: sorted classes, sorted names)."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets
    from torchvision import transforms as T

    geometry = (
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if train
        else [T.Resize(256), T.CenterCrop(224)]
    )  # fmt: skip
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    folder = datasets.ImageFolder(root / split, transform=T.Compose(geometry + tail))
    if keep is not None:
        folder = Subset(folder, keep.tolist())
    return DataLoader(folder, batch_size=batch, shuffle=train, num_workers=workers,
                      pin_memory=torch.cuda.is_available())  # fmt: skip


def one_pass(batches, device: torch.device) -> int:
    seen = 0
    for x, _ in batches:
        x = x.to(device, non_blocking=True)
        seen += len(x)
    return seen


def decode_ratios(root: Path, device, batch: int, workers: int, repeats: int, sync,
                  max_images: int | None = None) -> dict:  # fmt: skip
    out = {}
    for name, split, train in (("eval", "test", False), ("probe_train", "train", True)):
        ds = load_folder_split(root, split, workers=workers)
        keep = None
        if max_images and max_images < len(ds):  # e.g. real ImageNet: a balanced sample
            keep = balanced_subset(ds.labels["clean"], max_images, ds.num_classes)
            ds = ds.subset(keep)
        sides = {
            "torchvision": torchvision_loader(root, "val" if split == "test" else "train",
                                              train, batch, workers, keep),
            "nclayers": FolderBatches(ds, batch, device, train=train),
        }  # fmt: skip
        wall: dict[str, list] = {k: [] for k in sides}
        cpu: dict[str, list] = {k: [] for k in sides}
        for _ in range(repeats):
            for side, batches in sides.items():
                w, c, seen = timed(lambda b=batches: one_pass(b, device), sync)
                wall[side].append(seen / w)
                cpu[side].append(seen / c)
        per_s = {k: statistics.median(v) for k, v in wall.items()}
        per_cpu_s = {k: statistics.median(v) for k, v in cpu.items()}
        out[name] = {
            "images": len(ds), "images_per_s": per_s, "images_per_cpu_s": per_cpu_s,
            "ratio": per_s["nclayers"] / per_s["torchvision"],
            "cpu_ratio": per_cpu_s["nclayers"] / per_cpu_s["torchvision"],
        }  # fmt: skip
        print(f"{name:>12}: nclayers {per_s['nclayers']:.0f} img/s "
              f"({per_cpu_s['nclayers']:.0f} per CPU s), torchvision "
              f"{per_s['torchvision']:.0f} img/s ({per_cpu_s['torchvision']:.0f} per CPU s): "
              f"ratio {out[name]['ratio']:.2f} wall, {out[name]['cpu_ratio']:.2f} CPU")  # fmt: skip
    return out


@torch.no_grad()
def plain_inference(model, batches, amp: bool) -> None:
    for x, _ in batches:
        with autocast(x.device, amp):
            model(x)


def end_of_pass(table) -> None:
    """What analyze computes once after its pass: every block's NC1 and NC2 (K = 1000)."""
    for layer in table.stats:
        collapse_metrics(list(layer.values())).tolist()


def analyze_ratio(
    root: Path, device, batch: int, workers: int, repeats: int, amp, sync, profile: bool
):
    ds = load_folder_split(root, "test", workers=workers)
    torch.manual_seed(0)
    model = build_model("resnet50_in1k", num_classes=1000).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    batches = FolderBatches(ds, batch, device, channels_last=device.type == "cuda")
    # The NCC means: any reference costs the same per image; this one is measured once,
    # untimed (it is the run's training-split pass, not part of the validation pass).
    reference = nclayers.analyze(model, batches, 1000, amp=amp, progress=False)
    last: dict = {}  # the latest analysis, whose end of pass is then timed on its own

    def analysis():
        last["result"] = nclayers.analyze(model, batches, 1000, reference=reference, amp=amp,
                                          progress=False)  # fmt: skip
        return last["result"]

    runs = {
        "inference": lambda: plain_inference(model, batches, amp),
        "analyze": analysis,
        # The metrics' cost depends on the statistics (close class means are measured
        # again from exact differences), so it is timed on the pass's own.
        "end_of_pass": lambda: end_of_pass(last["result"]),
    }  # fmt: skip
    times: dict[str, dict[str, list]] = {k: {"wall": [], "cpu": [], "faults": []} for k in runs}
    # ABBA: a machine that slows down (or speeds up) over the run slows both sides alike.
    sides = [["inference", "analyze", "end_of_pass"], ["analyze", "end_of_pass", "inference"]]
    for r in range(repeats):
        for name in sides[r % 2]:
            # this process's page faults: on the CPU fresh pages for activations cost time
            faults = page_faults()
            w, c, result = timed(runs[name], sync)
            times[name]["wall"].append(w)
            times[name]["cpu"].append(c)
            times[name]["faults"].append(page_faults() - faults)
            if name == "analyze":
                assert len(result) == 16 and result[0]["n"] == len(ds)
    mean = {k: {c: statistics.fmean(v) for c, v in t.items()} for k, t in times.items()}
    out: dict = {"images": len(ds), "repeats": repeats, "seconds": mean,
                 "passes": times}  # each pass, in run order: the drift shows  # fmt: skip
    scale = VALIDATION_IMAGES / len(ds)
    for clock, key in (("wall", "ratio"), ("cpu", "cpu_ratio")):
        analyze, inference = mean["analyze"][clock], mean["inference"][clock]
        end = mean["end_of_pass"][clock]
        out[key] = analyze / inference
        out[f"{key}_50k"] = ((analyze - end) * scale + end) / (inference * scale)
    print(f"analyze {mean['analyze']['wall']:.1f} s ({mean['analyze']['cpu']:.1f} CPU s), "
          f"inference {mean['inference']['wall']:.1f} s ({mean['inference']['cpu']:.1f} CPU s) "
          f"over {len(ds)} images, mean of {repeats} in ABBA order; end of pass "
          f"{mean['end_of_pass']['wall']:.2f} s ({mean['end_of_pass']['cpu']:.2f} CPU s): ratio "
          f"{out['ratio']:.3f} wall, {out['cpu_ratio']:.3f} CPU; extrapolated to "
          f"{VALIDATION_IMAGES} images {out['ratio_50k']:.3f} wall, "
          f"{out['cpu_ratio_50k']:.3f} CPU; page faults per image: analyze "
          f"{mean['analyze']['faults'] / len(ds):.0f}, inference "
          f"{mean['inference']['faults'] / len(ds):.0f}")  # fmt: skip
    if profile and device.type == "cpu":  # what the analysis adds, whatever the neighbours do
        out.update(profiled_ratios(runs, scale))
    return out


def profiled_ratios(runs: dict, scale: float) -> dict:
    """analyze / inference from the operators analyze adds at their mean self CPU time:
    on this run's images, and with the per-batch part scaled by `scale` and the end of
    pass (profiled on its own, after the profiled analysis) counted once."""
    base = operator_times(runs["inference"])
    extra = added_time(base, operator_times(runs["analyze"]))
    end = self_time(operator_times(runs["end_of_pass"]))
    plain = self_time(base)
    out = {"profiled": 1.0 + extra / plain,
           "profiled_50k": 1.0 + ((extra - end) * scale + end) / (plain * scale)}  # fmt: skip
    print(f"profiled: analyze / inference = {out['profiled']:.3f} on these images, "
          f"{out['profiled_50k']:.3f} extrapolated to {VALIDATION_IMAGES} (the operators "
          f"analyze adds, at their mean self CPU time; end of pass {end / 1e6:.2f} s)")  # fmt: skip
    return out


def stats_memory(device) -> dict:
    """Device memory of one labels view's statistics per resnet50_in1k block, K = 1000."""
    with torch.device("meta"):
        model = build_model("resnet50_in1k", 1000)
        blocks = find_blocks(model)
        dims = [d for _, d in probe_shapes(model, blocks, torch.empty(1, 3, 224, 224))]
    views = LabelViews(["clean"], 1000, device)
    per_block = []
    for d in dims:
        stats = BlockStats(views, d)
        stats.update(torch.zeros(2, d, device=device), views.plan([torch.tensor([0, 1])]))
        size = sum(t.numel() * t.element_size() for t in (stats.shift, stats.s1, stats.s2))
        per_block.append(size / 2**20)
    print(f"statistics per block (MiB): {[round(m, 1) for m in per_block]}, "
          f"total {sum(per_block):.0f} MiB")  # fmt: skip
    return {"per_block": per_block, "total": sum(per_block), "dims": dims}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--folder", type=Path, help="an ImageFolder data set (train/, val/)")
    p.add_argument("--k1000", type=Path, help="a 1,000-class folder for the analysis")
    p.add_argument("--per-class", type=int, default=100, help="generated images per class")
    p.add_argument(
        "--max-images",
        type=int,
        default=10_000,
        help="decode: at most this many images per split (class-balanced)",
    )
    p.add_argument("--k1000-per-class", type=int, default=1, help="its val images per class")
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--batch-size", type=int, default=None, help="64 on CPU, 256 on CUDA")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--analyze-repeats", type=int, default=None,
                   help="passes of each side, in ABBA order: 2 on CPU, 4 on CUDA")  # fmt: skip
    p.add_argument("--only", choices=["decode", "analyze"], help="measure one part only")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also the profiled cost of the operators analyze adds (CPU)")  # fmt: skip
    return p.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    batch = args.batch_size or (256 if device.type == "cuda" else 64)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result: dict = {"device": str(device), "workers": args.workers, "batch_size": batch,
                    "torch_threads": torch.get_num_threads()}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "analyze":
            folder = args.folder
            if folder is None:
                folder = Path(tmp) / "folder"
                make_image_folder(folder, per_class=args.per_class,
                                  val_per_class=args.per_class, size=400, grain=8.0)  # fmt: skip
            result["decode_over_torchvision"] = decode_ratios(
                folder, device, batch, args.workers, args.repeats, sync, args.max_images
            )
        if args.only != "decode":
            k1000 = args.k1000
            if k1000 is None:
                k1000 = Path(tmp) / "k1000"
                make_k1000_folder(k1000, per_class=1, val_per_class=args.k1000_per_class,
                                  size=32)  # fmt: skip
            result["analyze_over_inference"] = analyze_ratio(
                k1000, device, batch, args.workers,
                args.analyze_repeats or (4 if device.type == "cuda" else 2),
                not args.no_amp, sync, args.profile)  # fmt: skip
            result["stats_memory_mb"] = stats_memory(device)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
