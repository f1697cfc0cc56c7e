"""The ImageNet input pipeline and the K = 1000 analysis, as ratios measured in one run.

    python benchmarks/imagenet_pipeline.py --json bench_imagenet.json
    python benchmarks/imagenet_pipeline.py --device cuda --folder /data/imagenet \\
        --json bench_imagenet_cuda.json

Folders: `--folder DIR` (ImageFolder layout, train/ and val/), else generated in a
temporary folder: digits upscaled to about ImageNet's sizes (400 px wide, aspect ratios
3/4 to 4/3, with grain so they decode like photographs), and a 1,000-class folder of tiny
images for the analysis. Prints and writes:

  decode_over_torchvision   images/s of nclayers' FolderBatches over torchvision's
                            ImageFolder + DataLoader (PIL decoding, Resize/CenterCrop or
                            RandomResizedCrop/flip, ToTensor, Normalize), the same workers,
                            batch size and device, batches moved to the device on both
                            sides: "eval" (val/, evaluation transform) and "probe_train"
                            (train/, probe-training augmentation)   target >= 1.5 on CPU
  analyze_over_inference    nclayers.analyze of resnet50_in1k (all 16 blocks, K = 1000, the
                            1,000-class folder's val/) over plain inference of the same
                            model on the same FolderBatches, same autocast (bf16 on CUDA
                            unless --no-amp, none on the CPU)       target <= 1.05
  stats_memory_mb           the statistics' device memory per block (K x D float64 sums
                            per labels view, and the shift), and their total

Each variant runs `--repeats` times, interleaved; the median time counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import nclayers
from nclayers.data import FolderBatches
from nclayers.data.folderbatches import default_workers
from nclayers.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, load_folder_split
from nclayers.data.make_folder import make_image_folder, make_k1000_folder
from nclayers.metrics import BlockStats, LabelViews
from nclayers.models import build_model, find_blocks
from nclayers.runtime import autocast
from nclayers.taps import probe_shapes


def torchvision_loader(root: Path, split: str, train: bool, batch: int, workers: int):
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    geometry = (
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if train
        else [T.Resize(256), T.CenterCrop(224)]
    )  # fmt: skip
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    folder = datasets.ImageFolder(root / split, transform=T.Compose(geometry + tail))
    return DataLoader(folder, batch_size=batch, shuffle=train, num_workers=workers,
                      pin_memory=torch.cuda.is_available())  # fmt: skip


def images_per_second(batches, device: torch.device, sync) -> float:
    start, seen = time.perf_counter(), 0
    for x, _ in batches:
        x = x.to(device, non_blocking=True)
        seen += len(x)
    sync()
    return seen / (time.perf_counter() - start)


def decode_ratios(root: Path, device, batch: int, workers: int, repeats: int, sync) -> dict:
    out = {}
    for name, split, train in (("eval", "test", False), ("probe_train", "train", True)):
        ds = load_folder_split(root, split, workers=workers)
        ours = FolderBatches(ds, batch, device, train=train)
        theirs = torchvision_loader(root, "val" if split == "test" else "train", train, batch,
                                    workers)  # fmt: skip
        rates = {"nclayers": [], "torchvision": []}
        for _ in range(repeats):
            rates["torchvision"].append(images_per_second(theirs, device, sync))
            rates["nclayers"].append(images_per_second(ours, device, sync))
        med = {k: statistics.median(v) for k, v in rates.items()}
        out[name] = {"images_per_s": med, "ratio": med["nclayers"] / med["torchvision"]}
        print(f"{name:>12}: nclayers {med['nclayers']:.0f} img/s, torchvision "
              f"{med['torchvision']:.0f} img/s, ratio {out[name]['ratio']:.2f}")  # fmt: skip
    return out


@torch.no_grad()
def plain_inference(model, batches, amp: bool) -> None:
    for x, _ in batches:
        with autocast(x.device, amp):
            model(x)


def analyze_ratio(root: Path, device, batch: int, workers: int, repeats: int, amp, sync):
    ds = load_folder_split(root, "test", workers=workers)
    torch.manual_seed(0)
    model = build_model("resnet50_in1k", num_classes=1000).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    batches = FolderBatches(ds, batch, device, channels_last=device.type == "cuda")
    plain_inference(model, FolderBatches(ds.subset(torch.arange(batch)), batch, device), amp)
    times = {"analyze": [], "inference": []}
    for _ in range(repeats):
        for name in ("inference", "analyze"):
            sync()
            t0 = time.perf_counter()
            if name == "analyze":
                table = nclayers.analyze(model, batches, 1000, amp=amp, progress=False)
            else:
                plain_inference(model, batches, amp)
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    assert len(table) == 16 and table[0]["n"] == len(ds)
    print(f"analyze {med['analyze']:.1f} s, inference {med['inference']:.1f} s over "
          f"{len(ds)} images: ratio {med['analyze'] / med['inference']:.3f}")  # fmt: skip
    return {"seconds": med, "images": len(ds), "ratio": med["analyze"] / med["inference"]}


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--folder", type=Path, help="an ImageFolder data set (train/, val/)")
    p.add_argument("--k1000", type=Path, help="a 1,000-class folder for the analysis")
    p.add_argument("--per-class", type=int, default=30, help="generated images per class")
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--batch-size", type=int, default=None, help="64 on CPU, 256 on CUDA")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--analyze-repeats", type=int, default=None, help="1 on CPU, 3 on CUDA")
    p.add_argument("--no-amp", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    batch = args.batch_size or (256 if device.type == "cuda" else 64)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = Path(tmp) / "folder"
            make_image_folder(folder, per_class=args.per_class, size=400, grain=8.0)
        k1000 = args.k1000
        if k1000 is None:
            k1000 = Path(tmp) / "k1000"
            make_k1000_folder(k1000, per_class=1, val_per_class=1, size=32)
        result = {
            "device": str(device), "workers": args.workers, "batch_size": batch,
            "decode_over_torchvision": decode_ratios(folder, device, batch, args.workers,
                                                     args.repeats, sync),
            "analyze_over_inference": analyze_ratio(
                k1000, device, batch, args.workers,
                args.analyze_repeats or (3 if device.type == "cuda" else 1),
                not args.no_amp, sync),
            "stats_memory_mb": stats_memory(device),
        }  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
