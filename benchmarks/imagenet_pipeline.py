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
wall-clock time, and CPU time (for decoding: this process and its DataLoader workers,
which are joined at the end of each pass; for the analysis: this process), because on a
shared machine the wall clock also measures the neighbours.
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
                            over plain inference of the same model (a copy without taps)
                            on the same FolderBatches, same autocast (bf16 on CUDA unless
                            --no-amp, none on the CPU), paired per batch: each batch goes
                            through inference right before or right after analyze works on
                            it, so drift over minutes cancels. "ratio", "cpu_ratio": on
                            this run's images, each pass's end-of-pass metrics (NC1, NC2 of
                            every block, timed on the pass's own statistics) included;
                            "ratio_50k", "cpu_ratio_50k": extrapolated to ImageNet's 50,000
                            validation images (per-image costs of the batches after a pass's
                            first; the first batch's extra and the end of pass once);
                            "*_pair_median", "*_pair_sem": the median and the standard
                            error of the per-batch ratios, what the noise leaves
                                                                      target <= 1.05;
                            with --profile (CPU) also "profiled" and "profiled_50k": the
                            operators analyze adds, each at the mean self CPU time of its
                            operator and input shapes (benchmarks/profiled.py), the end of
                            pass's operators counted once in the 50k figure
                            "batches": every batch's wall and CPU seconds and page faults
                            (this process's), per side and pass
  stats_memory_mb           the statistics' device memory per block (K x D float64 sums
                            per labels view, and the shift), and their total

Each decoding variant runs `--repeats` times, interleaved, and the median counts; the
analysis runs `--analyze-passes` passes. Whole passes of the two sides, one after the
other, drifted by up to 20 % here between identical passes, which a pass-level ratio
charges to whichever side ran slower; a pair of one batch is a few seconds apart.
"""

from __future__ import annotations

import argparse
import copy
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


class Paired:
    """The batches of `batches` for analyze, each also run through plain inference of
    `plain` (a copy of the analysed model, without taps) right before (even batches) or
    right after (odd batches) analyze works on it. Both sides are timed per batch: wall
    and CPU seconds of this process (decoding happens in the workers, outside both) and
    its page faults. The two halves of a pair run seconds apart on the same pixels, so
    what the machine's neighbours do over minutes is the same on both sides."""

    def __init__(self, batches, plain, amp: bool, sync) -> None:
        self.batches, self.plain, self.amp, self.sync = batches, plain, amp, sync
        self.views = getattr(batches, "views", None)
        self.rows: list[int] = []
        self.times = {side: {"wall": [], "cpu": [], "faults": []}
                      for side in ("inference", "analyze")}  # fmt: skip

    def __len__(self) -> int:
        return len(self.batches)

    def _now(self) -> tuple[float, float, int]:
        self.sync()
        return time.perf_counter(), time.process_time(), page_faults()

    def _record(self, side: str, start: tuple[float, float, int]) -> None:
        end = self._now()
        for clock, a, b in zip(("wall", "cpu", "faults"), start, end, strict=True):
            self.times[side][clock].append(b - a)

    def _infer(self, x: torch.Tensor) -> None:
        start = self._now()
        plain_inference(self.plain, [(x, None)], self.amp)
        self._record("inference", start)

    def __iter__(self):
        for i, (x, y) in enumerate(self.batches):
            self.rows.append(len(x))
            if i % 2 == 0:
                self._infer(x)
            start = self._now()
            yield x, y  # analyze works on this batch until it asks for the next
            self._record("analyze", start)
            if i % 2 == 1:
                self._infer(x)


def paired_ratios(passes: list[Paired], ends: list[dict], images: int) -> dict:
    """analyze / inference from the paired batches of every pass and the end of pass.

    On this run's images: all batches and the end of pass of each pass. Extrapolated to
    50,000 images: the per-image cost of every batch but a pass's first (which also
    allocates the statistics and fixes their shift), plus what the first batch adds over
    its inference and the end of pass, both once."""
    out: dict = {}
    for clock, key in (("wall", "ratio"), ("cpu", "cpu_ratio")):
        a = [p.times["analyze"][clock] for p in passes]
        i = [p.times["inference"][clock] for p in passes]
        end = statistics.fmean(e[clock] for e in ends)
        out[key] = (sum(map(sum, a)) + end * len(passes)) / sum(map(sum, i))
        rows = sum(sum(p.rows[1:]) for p in passes)
        per_image_a = sum(sum(t[1:]) for t in a) / rows
        per_image_i = sum(sum(t[1:]) for t in i) / rows
        first = statistics.fmean(ta[0] - ti[0] for ta, ti in zip(a, i, strict=True))
        out[f"{key}_50k"] = (per_image_a * VALIDATION_IMAGES + first + end) / (
            per_image_i * VALIDATION_IMAGES
        )
        pairs = [x / y for ta, ti in zip(a, i, strict=True)
                 for x, y in zip(ta[1:], ti[1:], strict=True)]  # fmt: skip
        out[f"{key}_pair_median"] = statistics.median(pairs)
        out[f"{key}_pair_sem"] = statistics.stdev(pairs) / len(pairs) ** 0.5
        out[f"{clock}_first_batch_extra_s"] = first
        out[f"{clock}_end_of_pass_s"] = end
    for side in ("analyze", "inference"):
        faults = sum(sum(p.times[side]["faults"]) for p in passes)
        out[f"faults_per_image_{side}"] = faults / (images * len(passes))
    out["pairs"] = len(pairs)
    out["batches"] = [p.times for p in passes]  # per pass, per batch: the noise shows
    return out


def analyze_ratio(
    root: Path, device, batch: int, workers: int, passes: int, amp, sync, profile: bool,
    image_size: int = 224,
):  # fmt: skip
    ds = load_folder_split(root, "test", workers=workers, image_size=image_size,
                           resize=image_size * 256 // 224)  # fmt: skip
    torch.manual_seed(0)
    model = build_model("resnet50_in1k", num_classes=1000).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    plain = copy.deepcopy(model)  # the inference side: the same weights, no taps
    batches = FolderBatches(ds, batch, device, channels_last=device.type == "cuda")
    # The NCC means: any reference costs the same per image; this one is measured once,
    # untimed (it is the run's training-split pass, not part of the validation pass).
    reference = nclayers.analyze(model, batches, 1000, amp=amp, progress=False)
    runs, ends, result = [], [], None
    for _ in range(passes):
        paired = Paired(batches, plain, amp, sync)
        result = nclayers.analyze(model, paired, 1000, reference=reference, amp=amp,
                                  progress=False)  # fmt: skip
        assert len(result) == 16 and result[0]["n"] == len(ds)
        # The metrics' cost depends on the statistics (close class means are measured
        # again from exact differences), so it is timed on the pass's own.
        wall, cpu, _ = timed(lambda r=result: end_of_pass(r), sync)
        runs.append(paired)
        ends.append({"wall": wall, "cpu": cpu})
    out = {"images": len(ds), "passes": passes, **paired_ratios(runs, ends, len(ds))}
    print(f"analyze over inference, {out['pairs']} batches paired over {passes} passes of "
          f"{len(ds)} images: {out['ratio']:.3f} wall, {out['cpu_ratio']:.3f} CPU (median "
          f"pair {out['ratio_pair_median']:.3f} +- {out['ratio_pair_sem']:.3f} standard "
          f"error); extrapolated to {VALIDATION_IMAGES} images {out['ratio_50k']:.3f} wall, "
          f"{out['cpu_ratio_50k']:.3f} CPU; a pass's first batch adds "
          f"{out['wall_first_batch_extra_s']:.2f} s, its end {out['wall_end_of_pass_s']:.2f} s;"
          f" page faults per image: analyze {out['faults_per_image_analyze']:.0f}, "
          f"inference {out['faults_per_image_inference']:.0f}")  # fmt: skip
    if profile and device.type == "cpu":  # what the analysis adds, whatever the neighbours do
        fns = {
            "inference": lambda: plain_inference(model, batches, amp),
            "analyze": lambda: nclayers.analyze(model, batches, 1000, reference=reference,
                                                amp=amp, progress=False),
            "end_of_pass": lambda: end_of_pass(result),
        }  # fmt: skip
        out.update(profiled_ratios(fns, VALIDATION_IMAGES / len(ds)))
    return out


def profiled_ratios(runs: dict, scale: float) -> dict:
    """analyze / inference from the operators analyze adds, each at the mean self CPU time
    of its operator and input shapes: on this run's images, and with the per-batch part
    scaled by `scale` and the end of pass (profiled on its own, after the profiled
    analysis) counted once."""
    base = operator_times(runs["inference"])
    extra = added_time(base, operator_times(runs["analyze"]))
    end = self_time(operator_times(runs["end_of_pass"]))
    plain = self_time(base)
    out = {"profiled": 1.0 + extra / plain,
           "profiled_50k": 1.0 + ((extra - end) * scale + end) / (plain * scale)}  # fmt: skip
    print(f"profiled: analyze / inference = {out['profiled']:.3f} on these images, "
          f"{out['profiled_50k']:.3f} extrapolated to {VALIDATION_IMAGES} (the operators "
          f"analyze adds, at the mean self CPU time of their operator and shapes; end of "
          f"pass {end / 1e6:.2f} s)")  # fmt: skip
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
    p.add_argument("--analyze-passes", type=int, default=4,
                   help="analyze passes, each batch paired with plain inference")  # fmt: skip
    p.add_argument("--only", choices=["decode", "analyze"], help="measure one part only")
    p.add_argument("--image-size", type=int, default=224,
                   help="the analysis' input size (224; less for a smoke run)")  # fmt: skip
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
                args.analyze_passes,
                not args.no_amp, sync, args.profile, args.image_size)  # fmt: skip
            result["stats_memory_mb"] = stats_memory(device)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
