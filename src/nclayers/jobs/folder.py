"""A run folder: every file name, every write, the lock, and which stages are up to date.

Every job reads and writes its run folder through `RunFolder`; the library below the jobs
never sees a path.

    run/
      config.yaml          the run: the settings that define its weights (train, or the
                           first stage that measures a model given by model.checkpoint)
      checkpoint.pt        trained weights, optimiser and RNG states (train)
      train_summary.json   accuracies, history, timings, label-noise fit (train)
      train.log            one line per epoch (train)
      nc_dynamics.csv      NC per block during training (train, when tracked)
      measurements/        one CSV per measurement: `<stage>-<key>.csv`, <key> a hash of the
                           settings that change its numbers (`stage_settings`); every row
                           names the block it measured; measuring again with the same
                           settings replaces it, with other settings adds one
      measurements.json    per measurement: stage, settings, weights, when
      layers.csv           the view: each stage's latest measurement (stages.json) whose
                           weights are the run's now, joined on (split, view, input, block);
                           `layer` is the block's position in forward order; written again
                           after every stage and training, never edited by hand
      summary.json         per stage: its settings, accuracies and timings
      probe.csv, probe_heads.pt, probe_state.pt (a resumable cache)   (probe)
      memorization.csv, memorization_layers.csv                       (memorization)
      prune.csv, prune_layers.csv; equality.csv, equality.json        (prune, equality)
      *.png                a stage's own figure; figures/ the report's, named by a hash of
                           the rows they draw and the plot settings (never stale)
      report.html          the self-contained report
      stages.json          finished stages: when, which weights, which settings
      manifest.json        sha256 of every file written here, to tell a damaged file
      .lock                held by the process working in the folder

Writes are atomic (temporary file, fsync, rename) and recorded in manifest.json (the new
checksum before the rename, the old one kept until the write is done, so a kill at any
moment leaves a file that checks); figures too (`draw`). A read checks the file against
it, so a file cut short or overwritten by anything else is refused naming the file and
what to do (a cache is dropped instead), and a stage whose files are missing or damaged
is out of date. A stage checks the files it reads back before it writes anything. Only
one process works in a folder at a time (`lock()`, a file lock; its first holder clears
temporary files a kill left): two sweeps that share a run never train it twice nor tear
a file. Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nclayers.config import (
    NOT_WEIGHTS,
    Config,
    canonical_settings,
    config_text,
    flatten,
    load_config,
    read_config_file,
    weights_settings,
)
from nclayers.errors import NCLayersError
from nclayers.files import atomic_open, atomic_write, dumps_json
from nclayers.jobs.stages import (  # the stages' own files, re-exported with the others
    CHECKPOINT,
    MEMORIZATION_LAYERS,
    PROBE,
    PROBE_HEADS,
    PRUNE,
    PRUNE_LAYERS,
    SUMMARY,
    TRAIN_SUMMARY,
)
from nclayers.jobs.stages import STAGES as DECLARED
from nclayers.table import Table, stage_columns

CONFIG = "config.yaml"
TRAIN_LOG = "train.log"
DYNAMICS = "nc_dynamics.csv"
LAYERS = "layers.csv"
PROBE_STATE = "probe_state.pt"
MEMORIZATION = "memorization.csv"
EQUALITY = "equality"  # equality.csv, equality.json, equality.png (+ "-SPLIT" off test)
REPORT = "report.html"
STAGES = "stages.json"
MANIFEST = "manifest.json"
LOCK = ".lock"
ERROR_LOG = "error.log"
MEASUREMENTS = "measurements"  # measurements/<stage>-<key>.csv
MEASURED = "measurements.json"

# Columns that identify a row of a measurement (with the measurement itself) and of the
# layers.csv view (which joins the stages' measurements on them), those that describe the
# block, and the measurement columns each stage owns there.
LAYER_KEYS = ("split", "view", "input", "block")
LAYER_DESCRIPTORS = ("run", "layer", "dim")
# Each stage's declaration (`nclayers.jobs.stages`) gives these tables: the columns it
# measures into layers.csv (declared with the column schema), the files a finished stage
# leaves (equality's, equality[-SPLIT].csv/.json, by its settings; one missing or damaged
# makes the stage out of date, so a sweep redoes it), which stages measure the weights,
# whose results another's depend on, and the config keys (prefixes) whose values a
# stage's result depends on; keys that only say where or how fast (data.dir, device,
# batch sizes) are left out.
STAGE_COLUMNS = {s.name: stage_columns(s.name) for s in DECLARED if stage_columns(s.name)}
STAGE_FILES = {s.name: s.files for s in DECLARED if s.files}
NEEDS_WEIGHTS = tuple(s.name for s in DECLARED if s.weights)
DEPENDS_ON = {s.name: s.depends_on for s in DECLARED if s.depends_on}
STAGE_SETTINGS = {s.name: s.settings for s in DECLARED if s.name != "train"}
# Stages whose results are measurements kept per settings (measurements/<stage>-<key>.csv),
# and those of them joined into the layers.csv view, in column order.
MEASURING = tuple(s.name for s in DECLARED if s.measured)
VIEW_STAGES = tuple(s for s in MEASURING if s in STAGE_COLUMNS)
UNSTEERING = ("data.dir", "data.download", "data.workers", "data.decoder",
              "probe.eval_batch_size", "probe.cache_dir", "model.checkpoint")  # fmt: skip

# What to do about a damaged file, by name.
REMEDY = {
    CONFIG: "the run's settings are lost: train it again in a new folder",
    CHECKPOINT: "the weights are lost: train again (nclayers train RUN --force), or copy a "
    "good checkpoint.pt back",
    STAGES: "delete it: every stage then runs again",
    MANIFEST: "delete it: files are then read without checking them against it",
    LAYERS: "delete it and run `nclayers analyze RUN` (and probe) again",
    SUMMARY: "delete it and run the run's stages again",
    TRAIN_SUMMARY: "train the run again (nclayers train RUN --force)",
    DYNAMICS: "delete it (the NC tracked so far is lost) and run train again",
}
log = logging.getLogger("nclayers.jobs")


class RunFolder:
    """A run folder: file names, atomic checked writes, the lock, stages and their state."""

    def __init__(self, path: str | Path, write: bool = True) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise NCLayersError(
                f"{str(self.path)!r} is a file, not a run folder; pass --out a folder path"
            )
        # Under torchrun every rank builds the folder, only rank 0 writes to it.
        self.writes = write
        self._lock = None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return self.file(name).is_file()

    def mkdir(self) -> RunFolder:
        if self.writes:
            self.path.mkdir(parents=True, exist_ok=True)
        return self

    # ----------------------------------------------------------------- lock
    @contextmanager
    def lock(self, wait_message: bool = True):
        """Hold the folder's file lock (re-entrant within this process). Another process
        that wants the folder waits until this one is done."""
        if not self.writes:
            yield self
            return
        from filelock import FileLock, Timeout

        self.mkdir()
        if self._lock is None:
            self._lock = FileLock(str(self.file(LOCK)), is_singleton=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            if wait_message:
                log.warning("%s is in use by another process; waiting for it", self.path)
            self._lock.acquire()
        if self._lock.lock_counter == 1:  # the first holder: clear writes torn by a kill
            for pattern in (".*.tmp", f"{MEASUREMENTS}/.*.tmp", "figures/.*.tmp"):
                for torn in self.path.glob(pattern):
                    torn.unlink(missing_ok=True)
        try:
            yield self
        finally:
            self._lock.release()

    # ----------------------------------------------------------------- writes
    def write(self, name: str, data: str | bytes) -> Path:
        """Write a file atomically and record its checksum (see `_expect`)."""
        if not self.writes:
            return self.file(name)
        with self.lock(wait_message=False):
            raw = data.encode() if isinstance(data, str) else data
            sha = hashlib.sha256(raw).hexdigest()
            self.mkdir()._expect(name, sha, len(raw))
            path = atomic_write(self.file(name), data)
            self._record(name, sha, len(raw))
        return path

    def append(self, name: str, text: str) -> Path:
        """Add `text` to the end of a log file (train.log, error.log), written like every
        other file: the whole file atomically, checksummed. A log damaged by something
        else is started over rather than refused (it is only a log)."""
        if not self.writes:
            return self.file(name)
        with self.lock(wait_message=False):
            try:
                old = self.read_bytes(name).decode("utf-8", "replace") if self.exists(name) else ""
            except NCLayersError:
                old = ""
            return self.write(name, old + text)

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write(name, dumps_json(obj))

    def write_table(self, name: str, table: Table) -> Path:
        return self.write(name, table.to_csv_text())

    def save_torch(self, name: str, obj: Any) -> Path:
        """torch.save atomically, hashing the bytes as they are written."""
        import torch

        if not self.writes:
            return self.file(name)
        with self.lock(wait_message=False):
            path = self.mkdir().file(name)
            with atomic_open(path, "wb") as f:
                hashing = _HashingWriter(f)
                torch.save(obj, hashing)
                self._expect(name, hashing.sha.hexdigest(), hashing.size)  # before the rename
            self._record(name, hashing.sha.hexdigest(), hashing.size)
        return path

    def draw(self, name: str, plot: Callable[[Path], Any]) -> Path | None:
        """A figure drawn by `plot(path)` (a plotting function that writes `path`), written
        like every other file: atomically and checksummed. Under torchrun only rank 0
        draws. None when `plot` drew nothing."""
        if not self.writes:
            return None
        with tempfile.TemporaryDirectory(prefix="nclayers-") as tmp:
            drawn = Path(tmp) / Path(name).name
            if plot(drawn) is None or not drawn.is_file():
                return None
            return self.write(name, drawn.read_bytes())

    def draw_all(self, plot: Callable[[Path], Any], under: str = "") -> list[Path]:
        """Every file `plot(tmpdir)` writes into a temporary folder, written into this
        folder (below `under`) like every other file."""
        if not self.writes:
            return []
        with tempfile.TemporaryDirectory(prefix="nclayers-") as tmp:
            plot(Path(tmp))
            drawn = sorted(p for p in Path(tmp).iterdir() if p.is_file())
            return [self.write(f"{under}/{p.name}" if under else p.name, p.read_bytes())
                    for p in drawn]  # fmt: skip

    def remove(self, *names: str) -> None:
        if not self.writes:
            return
        with self.lock(wait_message=False):
            for name in names:
                self.file(name).unlink(missing_ok=True)
            manifest = self._manifest()
            if any(n in manifest for n in names):
                self._write_manifest({k: v for k, v in manifest.items() if k not in names})

    def _expect(self, name: str, sha: str, size: int) -> None:
        """Before a file is renamed into place: record its new checksum and keep the old
        one as "was", so that a kill between the rename and `_record` (or before the
        rename) leaves a file that still checks, old or new, instead of one that reads
        as damaged."""
        if name == MANIFEST:
            return
        manifest = self._manifest()
        old = manifest.get(name)
        if old is not None and "was" in old:  # an earlier write was cut short: either
            old = old if self._matches(name, old) else old["was"]
        manifest[name] = {"sha256": sha, "bytes": size, "was": _plain(old)}
        self._write_manifest(manifest)

    def _record(self, name: str, sha: str, size: int) -> None:
        if name == MANIFEST:
            return
        manifest = self._manifest()
        manifest[name] = {"sha256": sha, "bytes": size}
        self._write_manifest(manifest)

    def _manifest(self) -> dict:
        if not self.exists(MANIFEST):
            return {}
        try:
            obj = json.loads(self.file(MANIFEST).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            obj = None
        if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
            raise self.damaged(MANIFEST, "not the checksum list nclayers writes")
        return obj

    def _write_manifest(self, manifest: dict) -> None:
        atomic_write(self.file(MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))

    # ----------------------------------------------------------------- checked reads
    def damaged(self, name: str, why: str) -> NCLayersError:
        remedy = REMEDY.get(name, "delete it and run the stage that writes it again")
        return NCLayersError(f"{self.file(name)} is damaged ({why}); {remedy}")

    def verify(self, name: str) -> Path:
        """The file's path, after checking it against the checksum written with it."""
        path = self.file(name)
        entry = self._manifest().get(name)
        if entry is None or not path.is_file():
            return path
        self._written(name, entry)
        return path

    def _written(self, name: str, entry: dict) -> dict:
        """The manifest entry the file matches: the last write's, or (when that write was
        cut short by a kill) the one before it; a file matching neither is damaged."""
        if self._matches(name, entry):
            return entry
        was = entry.get("was")
        if isinstance(was, dict) and self._matches(name, was):
            return was
        size = self.file(name).stat().st_size
        if size != entry.get("bytes") and not (isinstance(was, dict) and size == was.get("bytes")):
            raise self.damaged(name, f"{size} bytes, {entry.get('bytes')} were written")
        raise self.damaged(name, "its contents differ from what nclayers wrote")

    def _matches(self, name: str, entry: dict) -> bool:
        path = self.file(name)
        return (path.is_file() and path.stat().st_size == entry.get("bytes")
                and file_sha256(path) == entry.get("sha256"))  # fmt: skip

    def read_bytes(self, name: str) -> bytes:
        return self.verify(name).read_bytes()

    def read_json(self, name: str, default: Any = None) -> Any:
        """A JSON file's object (`default` when the file does not exist)."""
        if not self.exists(name):
            return {} if default is None else default
        try:
            obj = json.loads(self.read_bytes(name).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise self.damaged(name, f"not valid JSON: {err}") from None
        if not isinstance(obj, type(default) if default is not None else dict):
            raise self.damaged(name, f"expected a JSON object, found {type(obj).__name__}")
        return obj

    def read_table(self, name: str, schema: dict | None = None) -> Table:
        """A CSV of the folder (an empty Table when it does not exist)."""
        if not self.exists(name):
            return Table(schema=schema)
        data = self.read_bytes(name)
        try:
            return Table.from_csv_text(data.decode("utf-8"), str(self.file(name)), schema)
        except UnicodeDecodeError:
            raise self.damaged(name, "not text") from None
        except NCLayersError as err:
            remedy = REMEDY.get(name, "delete it and run the stage that writes it again")
            raise NCLayersError(f"{err}; {remedy}") from None

    def check_inputs(self, *names: str) -> None:
        """Refuse now, before a stage writes anything, when a file it reads later (to
        write it back: layers.csv, summary.json, stages.json) is damaged: a stage never
        fails halfway with some of its files rewritten."""
        self.check_layout()
        for name in names:
            if not self.exists(name):
                continue
            if name == STAGES:
                self.stages()
            elif name.endswith(".json"):
                self.read_json(name)
            elif name.endswith(".csv"):
                self.read_table(name)
            else:
                self.verify(name)

    def load_torch(self, name: str, cache: bool = False) -> Any:
        """A torch file (weights_only). A damaged cache (`cache=True`) is removed and None
        returned; any other damaged file is refused."""
        import pickle

        import torch

        try:
            self.verify(name)
            return torch.load(self.file(name), map_location="cpu", weights_only=True)
        except (NCLayersError, RuntimeError, OSError, EOFError, pickle.UnpicklingError,
                ValueError, KeyError, AttributeError, TypeError) as err:  # fmt: skip
            if cache:
                log.warning("%s is damaged (%s); it is only a cache: starting over",
                            self.file(name), _first_line(err))  # fmt: skip
                self.remove(name)
                return None
            if isinstance(err, NCLayersError):
                raise
            raise self.damaged(name, f"torch.load failed: {_first_line(err)}") from None

    # ----------------------------------------------------------------- the run's config
    def has_run(self) -> bool:
        return self.exists(CONFIG)

    def config(self, overrides: Sequence[str] = ()) -> Config:
        """The run's saved config with `key=value` overrides (for this call only)."""
        if not self.exists(CONFIG):
            raise NCLayersError(
                f"{str(self.path)!r} is not a run folder (no {CONFIG}); pass a folder written "
                "by `nclayers train` or `nclayers analyze`, or a config file"
            )
        check_edited_config(self)
        return load_config(self.file(CONFIG), overrides)

    def save_config(self, cfg: Config) -> None:
        self.write(CONFIG, config_text(cfg))

    def adopt(self, cfg: Config) -> None:
        """Make this folder `cfg`'s run: write config.yaml if there is none (call it once the
        stage succeeded; `check_run` first)."""
        self.check_run(cfg)
        if not self.has_run():
            self.save_config(cfg)

    def check_run(self, cfg: Config) -> None:
        """Refuse when the folder holds another run (other data, model or training
        settings) than `cfg` describes."""
        if not self.has_run():
            return
        mine = weights_settings(self.config())
        theirs = weights_settings(cfg)
        # Which weights a stage measures is its own record (stages.json), not the run's.
        chosen = ("model.checkpoint", "model.untrained")
        diff = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k)
                      and k not in chosen)  # fmt: skip
        if diff:
            shown = ", ".join(
                f"{k}: {mine.get(k)!r} here, {theirs.get(k)!r} asked" for k in diff[:4]
            )
            raise NCLayersError(
                f"{self.path} holds another run ({shown}); pass the run folder itself "
                "(nclayers VERB RUN), or --out a new folder"
            )

    # ----------------------------------------------------------------- stages
    def stages(self) -> dict[str, dict]:
        stages = self.read_json(STAGES)
        if not all(isinstance(v, dict) for v in stages.values()):
            raise self.damaged(STAGES, "expected one object per stage")
        return stages

    def mark_done(self, stage: str, cfg: Config, **info: Any) -> dict:
        """Record a finished stage: when, the weights and settings it used, its inputs."""
        stages = self.stages()
        record = {
            "id": uuid.uuid4().hex[:12],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "settings": stage_settings(stage, cfg),
            "inputs": {d: stages.get(d, {}).get("id") for d in DEPENDS_ON.get(stage, ())},
            **info,
        }
        if stage in NEEDS_WEIGHTS:
            record["weights"] = self.weights(cfg)
        if stage in MEASURING:
            record["key"] = measurement_key(stage, cfg)
            measured = self.measurements()
            self.write_json(MEASURED, {**measured, record["key"]: {"stage": stage, **record}})
        stages[stage] = record
        if stage in VIEW_STAGES:  # the view first: a kill between leaves the stage not done
            self.refresh_layers(stages)
        self.write_json(STAGES, stages)
        return record

    def forget(self, *stages: str) -> None:
        current = self.stages()
        if any(s in current for s in stages):
            self.write_json(STAGES, {k: v for k, v in current.items() if k not in stages})

    def status(self, stage: str, cfg: Config) -> str:
        """ "done", "missing", or "out of date: why" for `stage` run with `cfg` now."""
        stages = self.stages()
        record = stages.get(stage)
        if record is None:
            return "missing"
        if stage in MEASURING:
            if "key" not in record:
                return f"out of date: {self._older_layout()}"
            found = self.measurement(stage, cfg)
            if found is None:  # measured, but not at these settings
                return self._settings_changed(stage, cfg, record) or "missing"
            record = found
        broken = self._broken_output(stage, cfg)
        if broken:
            return f"out of date: {broken}"
        if stage == "train":
            if record.get("weights", {}).get("sha256") != self.checkpoint_sha():
                return "out of date: checkpoint.pt changed since training finished"
        if stage in NEEDS_WEIGHTS:
            try:
                now = self.weights(cfg)
            except NCLayersError:
                return "out of date: no trained weights now"
            then = record.get("weights") or {}
            if then.get("sha256") != now.get("sha256"):
                was, new = then.get("epoch"), now.get("epoch")
                epochs = f" (epoch {was} then, {new} now)" if was != new else ""
                return f"out of date: the weights changed{epochs}"
        for dep in DEPENDS_ON.get(stage, ()):
            if (record.get("inputs") or {}).get(dep) != stages.get(dep, {}).get("id"):
                return f"out of date: {dep} ran again since"
        return self._settings_changed(stage, cfg, record) or "done"

    def _settings_changed(self, stage: str, cfg: Config, record: dict) -> str | None:
        settings = stage_settings(stage, cfg)
        then = canonical_settings(record.get("settings") or {})
        # A key added to nclayers after the stage ran had its default value then.
        default = stage_settings(stage, Config())
        keys = sorted(
            k
            for k in {*then, *settings}
            if then.get(k, default.get(k)) != settings.get(k, default.get(k))
        )
        if keys:
            return f"out of date: settings changed ({', '.join(keys[:4])})"
        return None

    def stage_files(self, stage: str, cfg: Config) -> tuple[str, ...]:
        """The files `stage` (run with `cfg`) leaves in the folder."""
        if stage in MEASURING:
            found = self.measurement(stage, cfg)
            key = found["key"] if found else measurement_key(stage, cfg)
            return (measurement_file(stage, key), *STAGE_FILES.get(stage, ()))
        if stage == "equality":
            stem = equality_stem(cfg.equality)
            return (f"{stem}.csv", f"{stem}.json")
        return STAGE_FILES.get(stage, ())

    def _broken_output(self, stage: str, cfg: Config) -> str | None:
        """Which of the stage's files is missing or damaged (None: all are whole)."""
        for name in self.stage_files(stage, cfg):
            if not self.exists(name):
                return f"{name} is missing"
            try:
                self.verify(name)
            except NCLayersError:
                return f"{self.file(name)} is damaged"
        return None

    def done(self, stage: str, cfg: Config) -> bool:
        return self.status(stage, cfg) == "done"

    # ----------------------------------------------------------------- weights
    def checkpoint_sha(self) -> str | None:
        entry = self._manifest().get(CHECKPOINT)
        if entry is not None and "was" in entry and self.exists(CHECKPOINT):
            entry = self._written(CHECKPOINT, entry)  # a write cut short: which one is there
        if entry is not None:
            return entry.get("sha256")
        return file_sha256(self.file(CHECKPOINT)) if self.exists(CHECKPOINT) else None

    def weights(self, cfg: Config) -> dict[str, Any]:
        """Which weights `cfg` measures in this folder: model.checkpoint, the folder's
        checkpoint.pt, a Hugging Face model folder, or (model.untrained) none on purpose.
        Refuses when there are no trained weights."""
        mc = cfg.model
        if mc.untrained:
            return {"untrained": True, "sha256": "untrained"}
        if mc.checkpoint:
            path = Path(mc.checkpoint)
            if not path.is_file():
                raise NCLayersError(
                    f"model.checkpoint={mc.checkpoint!r}: no such file; pass the path of a "
                    "weights file (nclayers, torchvision, timm or mmpretrain). Nothing is "
                    "downloaded at run time: the paper's ImageNet weights are files of "
                    "mmpretrain's model zoo, listed with their URLs in docs/imagenet.md and "
                    "in the header of each configs/paper/fig*-imagenet.yaml"
                )
            return {"file": str(path.resolve()), "sha256": file_sha256(path)}
        if self.exists(CHECKPOINT):
            train = self.stages().get("train") or {}
            sha = self.checkpoint_sha()
            epoch = (train.get("weights") or {}).get("epoch")
            return {"file": CHECKPOINT, "sha256": sha, "epoch": epoch}
        if mc.name.startswith("hf:") and Path(mc.name[3:]).is_dir():
            return {"hf": mc.name, "sha256": _folder_stamp(Path(mc.name[3:]))}
        if mc.name.startswith("hf:"):  # a hub id: from_pretrained's weights
            return {"hf": mc.name, "sha256": mc.name}
        raise NCLayersError(
            f"{self.path} has no trained weights (no {CHECKPOINT}): train it first "
            f"(nclayers train ... --out {self.path}), pass model.checkpoint=FILE, or "
            "model.untrained=true to measure the model as initialised"
        )

    # ----------------------------------------------------------------- measurements
    def measurements(self) -> dict[str, dict]:
        """Every measurement kept in the folder: key -> its record (stage, settings,
        weights, when)."""
        measured = self.read_json(MEASURED)
        if not all(isinstance(v, dict) for v in measured.values()):
            raise self.damaged(MEASURED, "expected one object per measurement")
        return measured

    def measurement(self, stage: str, cfg: Config) -> dict | None:
        """The record of `stage`'s measurement at `cfg`'s settings (None: not measured so).
        A settings key added to nclayers later counts at its default value."""
        want = stage_settings(stage, cfg)
        default = stage_settings(stage, Config())
        exact = self.measurements().get(measurement_key(stage, cfg))
        if exact is not None and exact.get("stage") == stage:
            return exact
        for record in reversed(self.measurements().values()):
            then = canonical_settings(record.get("settings") or {})
            if record.get("stage") == stage and all(
                then.get(k, default.get(k)) == want.get(k, default.get(k)) for k in {*then, *want}
            ):
                return record
        return None

    def save_measurement(self, stage: str, cfg: Config, rows: Iterable[dict]) -> Table:
        """Keep a stage's rows as its measurement at `cfg`'s settings (replacing the one
        made with the same settings); `mark_done` then records it and redraws the view."""
        key = measurement_key(stage, cfg)
        table = Table({"measurement": key, **r} for r in rows)
        self.write_table(measurement_file(stage, key), table)
        return table

    def measured_rows(self, stage: str, cfg: Config | None = None) -> Table:
        """The rows of `stage`'s measurement at `cfg`'s settings (None: its latest, as
        stages.json records it); an empty Table when there is none."""
        record = self.measurement(stage, cfg) if cfg is not None else self.stages().get(stage)
        if not record or "key" not in record:
            return Table()
        return self.read_table(measurement_file(stage, record["key"]))

    # ----------------------------------------------------------------- layers.csv
    def layers(self) -> Table:
        return self.read_table(LAYERS)

    def layers_at(self, cfg: Config | None = None, stages: dict | None = None) -> Table:
        """The layers view: per stage, its measurement at `cfg`'s settings (None: the
        latest) made with the weights the run holds now, joined on the block's row key.
        A value is never shown on a row of another block."""
        try:
            now = self.checkpoint_sha() if self.exists(CHECKPOINT) else None
        except NCLayersError:
            now = None
        tables = []
        stages = self.stages() if stages is None else stages
        for stage in VIEW_STAGES:
            record = self.measurement(stage, cfg) if cfg else stages.get(stage)
            if not record or "key" not in record:
                continue
            then = (record.get("weights") or {}).get("sha256")
            if (record.get("weights") or {}).get("file") == CHECKPOINT and then != now:
                continue  # measured on weights the run no longer holds
            tables.append((stage, self.read_table(measurement_file(stage, record["key"]))))
        return join_layers(tables)

    def refresh_layers(self, stages: dict | None = None) -> Table:
        """Write layers.csv again from the measurements `stages` (default: stages.json)
        records (removed when none is current)."""
        table = self.layers_at(stages=stages)
        if table:
            self.write_table(LAYERS, table)
        elif self.exists(LAYERS) and (stages or self.stages()):
            self.remove(LAYERS)
        return table

    def merge_layers(self, stage: str, rows: Iterable[dict], cfg: Config | None = None) -> Table:
        """Keep `rows` as `stage`'s measurement and show them in layers.csv (tests and
        tools that hold rows without a job; jobs use `save_measurement` + `mark_done`)."""
        cfg = cfg or Config()
        self.save_measurement(stage, cfg, rows)
        key = measurement_key(stage, cfg)
        stages = self.stages()
        record = {"key": key, "settings": stage_settings(stage, cfg), "weights": {}}
        stages[stage] = {**stages.get(stage, {}), **record}
        self.write_json(MEASURED, {**self.measurements(), key: {"stage": stage, **record}})
        table = self.refresh_layers(stages)
        self.write_json(STAGES, stages)
        return table

    # ----------------------------------------------------------------- older layouts
    def _older_layout(self) -> str:
        return (f"{self.path} was written by an older nclayers (layers.csv keyed by layer "
                f"index); convert it with `nclayers upgrade {self.path}`")  # fmt: skip

    def is_older_layout(self) -> bool:
        if not self.exists(STAGES):
            return False
        stages = self.stages()
        return any(s in stages and "key" not in stages[s] for s in MEASURING)

    def check_layout(self) -> None:
        """Refuse, in one line saying how to convert it, a folder of the older layout."""
        if self.is_older_layout():
            raise NCLayersError(self._older_layout())

    def upgrade(self) -> list[str]:
        """Convert a folder of the older layout: each recorded measuring stage's values in
        layers.csv (memorization.csv) become its measurement at its recorded settings.
        Returns the stages converted."""
        if not self.exists(STAGES):
            raise NCLayersError(
                f"upgrade: {str(self.path)!r} holds no {STAGES}; pass a run folder written "
                "by nclayers"
            )
        with self.lock():
            stages, done = self.stages(), self._upgrade_config()
            layers = self.layers() if self.exists(LAYERS) else Table()
            for stage in MEASURING:
                record = stages.get(stage)
                if not record or "key" in record:
                    continue
                settings = record.get("settings") or {}
                key = _key(stage, canonical_settings(settings))
                if stage == "memorization":
                    rows = self.read_table(MEMORIZATION) if self.exists(MEMORIZATION) else Table()
                else:
                    owned = STAGE_COLUMNS[stage]
                    rows = Table(
                        {k: v for k, v in r.items() if k not in _other_columns(stage)}
                        for r in layers
                        if any(r.get(c) is not None for c in owned)
                    )
                self.write_table(measurement_file(stage, key),
                                 Table({"measurement": key, **r} for r in rows))  # fmt: skip
                record["key"] = key
                self.write_json(MEASURED, {**self.measurements(), key: {"stage": stage, **record}})
                done.append(stage)
            self.write_json(STAGES, stages)
            self.refresh_layers()
        return done

    def _upgrade_config(self) -> list[str]:
        """config.yaml of an older nclayers: its single probe learning rate (`probe.lr`)
        becomes the one-entry grid that measured it (`probe.lrs: [lr]`)."""
        if not self.exists(CONFIG):
            return []
        import yaml

        data = yaml.safe_load(self.read_bytes(CONFIG)) or {}
        probe = data.get("probe")
        if not isinstance(probe, dict) or "lr" not in probe:
            return []
        probe["lrs"] = [probe.pop("lr")]
        self.write(CONFIG, yaml.safe_dump(data, sort_keys=False))
        return ["config.yaml (probe.lr -> probe.lrs)"]


def measurement_key(stage: str, cfg: Config) -> str:
    """A short hash of the settings that change a stage's numbers (`stage_settings`)."""
    return _key(stage, stage_settings(stage, cfg))


def _key(stage: str, settings: dict) -> str:
    text = json.dumps({"stage": stage, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def measurement_file(stage: str, key: str, part: str = "") -> str:
    """A measurement's rows (or another of its tables, `part`, e.g. the probe's history)."""
    return f"{MEASUREMENTS}/{stage}-{key}{'-' + part if part else ''}.csv"


def _other_columns(stage: str) -> set[str]:
    return {c for s, cols in STAGE_COLUMNS.items() if s != stage for c in cols}


def join_layers(tables: Sequence[tuple[str, Table]]) -> Table:
    """Join the stages' measurements on (split, view, input, block): each stage's columns
    come from its own rows only; `measurement` says which measurement gave the row's
    values (`stage=key`, one per stage)."""
    index: dict[tuple, dict] = {}
    order: dict[str, dict] = {"split": {}, "view": {}}
    for stage, rows in tables:
        owned = STAGE_COLUMNS[stage]
        for r in rows:
            key = _row_key(r)
            for k in order:
                order[k].setdefault(r.get(k) or "", len(order[k]))
            row = index.setdefault(key, {k: r.get(k) for k in ("run", *LAYER_KEYS) if k in r})
            for k in LAYER_DESCRIPTORS:
                if row.get(k) in (None, "") and r.get(k) not in (None, ""):
                    row[k] = r.get(k)
            row.update({k: r.get(k) for k in owned if k in r})
            tag = f"{stage}={r.get('measurement')}"
            row["measurement"] = " ".join(filter(None, [row.get("measurement"), tag]))
    from nclayers.probing.result import underfit

    for row in index.values():  # derived: a probe below the NCC of the same row underfits
        if row.get("probe_acc") is not None:
            row["probe_underfit"] = underfit(row["probe_acc"], row.get("ncc_acc"))
    rows = sorted(index.values(), key=lambda r: (
        order["split"].get(r.get("split") or "", 0), order["view"].get(r.get("view") or "", 0),
        r.get("input") or "", r.get("layer") or 0))  # fmt: skip
    return Table(rows)


def check_edited_config(folder: RunFolder) -> None:
    """config.yaml as written, or edited by hand in keys that leave the weights as they
    are (data.dir after moving the data, ...): such an edit is accepted, said once and
    recorded. An edit of a key that defines the weights (recorded by the stages that ran)
    is refused naming each change; a file that no longer reads as a config is damaged."""
    try:
        folder.verify(CONFIG)
        return
    except NCLayersError as damaged:
        error = damaged
    try:
        written = flatten(read_config_file(folder.file(CONFIG)))
        now = flatten(load_config(folder.file(CONFIG)).to_dict())
    except NCLayersError as err:
        raise NCLayersError(
            f"{folder.file(CONFIG)} is damaged: it changed since nclayers wrote it and no "
            f"longer reads as a config ({err}); undo the edit, or else {REMEDY[CONFIG]}"
        ) from None
    recorded = {k: v for r in folder.stages().values() for k, v in
                canonical_settings(r.get("settings") or {}).items()}  # fmt: skip
    if not recorded or set(flatten(Config().to_dict())) - set(written):
        raise error  # nothing to compare it with, or keys missing: cut short, not edited
    fixed = [k for k in recorded if k.split(".", 1)[0] in ("data", "model", "train")
             and k not in NOT_WEIGHTS and k != "model.checkpoint"]  # fmt: skip
    changed = [f"{k}: {recorded[k]!r} -> {now.get(k)!r}" for k in fixed
               if k in now and now[k] != recorded[k]]  # fmt: skip
    if changed:
        raise NCLayersError(
            f"{folder.file(CONFIG)} was edited in keys that define the trained weights "
            f"({'; '.join(changed[:4])}); undo the edit (measurement keys such as data.dir may "
            f"change freely), or train the edited run in a new folder: nclayers train "
            f"{folder.file(CONFIG)} --out NEW_FOLDER"
        )
    raw = folder.file(CONFIG).read_bytes()
    if folder.writes:
        with folder.lock(wait_message=False):
            folder._record(CONFIG, hashlib.sha256(raw).hexdigest(), len(raw))
    log.warning("%s was edited; the keys that define the weights are unchanged: accepted",
                folder.file(CONFIG))  # fmt: skip


def equality_stem(ec) -> str:
    """equality.csv/.json/.png are named "equality", "equality-SPLIT" off the test split."""
    return EQUALITY if ec.split == "test" else f"{EQUALITY}-{slug(ec.split)}"


def slug(value) -> str:
    """Text as a file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value or "")).strip("_")


def stage_settings(stage: str, cfg: Config) -> dict[str, Any]:
    """The settings a stage's result depends on, flattened (for train: the weights')."""
    if stage == "train":
        return weights_settings(cfg)
    flat = flatten(cfg.to_dict())
    prefixes = STAGE_SETTINGS.get(stage, ())
    return {
        k: v
        for k, v in sorted(flat.items())
        if k not in UNSTEERING and any(k == p or k.startswith(p + ".") for p in prefixes)
    }


def file_sha256(path: str | Path, _cache: dict = {}) -> str:  # noqa: B006
    """The file's sha256, remembered per path, inode, size and times: an atomic write
    renames a new inode into place, so a file rewritten within one tick of the coarse
    file clock (same size, same times) is still hashed again."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _cache:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        _cache[key] = sha.hexdigest()
    return _cache[key]


def _folder_stamp(path: Path) -> str:
    """A cheap identity of a model folder: names, sizes and times of its files."""
    parts = sorted(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in path.iterdir())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _plain(entry: dict | None) -> dict | None:
    """A manifest entry without its own "was" (one write back is all a kill can leave)."""
    return None if entry is None else {"sha256": entry.get("sha256"), "bytes": entry.get("bytes")}


def _row_key(row: dict) -> tuple:
    return tuple("" if row.get(k) is None else row.get(k) for k in LAYER_KEYS)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through (for torch.save)."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


__all__ = [
    "CHECKPOINT",
    "MEMORIZATION_LAYERS",
    "PROBE",
    "PROBE_HEADS",
    "PRUNE",
    "PRUNE_LAYERS",
    "SUMMARY",
    "TRAIN_SUMMARY",
    "RunFolder",
    "check_edited_config",
    "equality_stem",
    "file_sha256",
    "slug",
    "stage_settings",
]
