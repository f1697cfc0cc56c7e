"""The HTML report: escaping, inlined figures, sections; rendered in a real browser."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from nclayers.cli import main
from nclayers.config import Config
from nclayers.jobs.report import write_report
from nclayers.report.html import Figure, Section, render_html
from nclayers.table import Table

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVIL = '<script>alert("x")</script>&<b>'
PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


class Page(HTMLParser):
    """Collects what a reader and a browser would see: text, tags, images, scripts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []
        self.images: list[dict] = []
        self.scripts = 0
        self.body: dict = {}
        self.headings: list[str] = []
        self._heading = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "body":
            self.body = attrs
        self._heading = tag in ("h1", "h2", "h3", "summary")

    def handle_endtag(self, tag):
        self._heading = False

    def handle_data(self, data):
        self.text.append(data)
        if self._heading and data.strip():
            self.headings.append(data.strip())


def decoded_images(page: Page) -> list[bytes]:
    out = []
    for img in page.images:
        head, _, data = img["src"].partition(",")
        assert head in ("data:image/png;base64", "data:image/svg+xml;base64"), head
        out.append(base64.b64decode(data))
    return out


def test_values_are_escaped_and_figures_inlined(tmp_path):
    png = tmp_path / "f.png"
    png.write_bytes(PNG_1x1)
    table = Table([{"block": EVIL, "nc1": 1.5, "memorizing": True}])
    text = render_html(
        f"title {EVIL}",
        [Section(EVIL, text=EVIL, items={EVIL: EVIL}, figures=[Figure(png, EVIL)], table=table,
                 code=EVIL, subsections=[Section("inner", text="x", collapsed=True)])],
    )  # fmt: skip
    page = Page(text)
    assert page.scripts == 1  # only the page's own figure check; none from the data
    assert "b" not in page.tags  # '<b>' in the data stayed text
    assert "".join(page.text).count(EVIL) >= 6  # title, heading, text, key, value, cell, code
    assert decoded_images(page) == [PNG_1x1]
    assert page.images[0]["alt"] == EVIL
    assert "details" in page.tags and "inner" in page.headings


def test_figure_refuses_what_it_cannot_inline(tmp_path):
    pdf = tmp_path / "f.pdf"
    pdf.write_bytes(b"%PDF-1.4")
    with pytest.raises(ValueError, match=r"\.pdf"):
        Figure(pdf).data_uri()


def make_run_folder(folder: Path, noise: float = 0.4) -> Path:
    """A run folder as train + analyze + probe leave it (tables written by hand)."""
    cfg = Config().updated({"run": "r40", "data.noise": noise, "model.width": 8})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    rows = []
    for layer in (1, 2, 3, 4):
        for split, views in (("train", ("clean", "noisy")), ("test", ("clean",))):
            for view in views:
                nc1 = 8.0 / layer * (0.5 if view == "noisy" and layer >= 3 else 1.0)
                rows.append({"run": "r40", "split": split, "view": view, "layer": layer,
                             "block": f"layer{layer}.0" if layer < 4 else EVIL, "dim": 8,
                             "nc1": nc1, "nc2": 0.3, "ncc_acc": 0.7,
                             "probe_acc": 0.6 if split == "test" else None})  # fmt: skip
    Table(rows).to_csv(folder / "layers.csv")
    history = [{"epoch": 1, "lr": 0.1, "train_acc": 0.5, "test_acc": 0.4, "seconds": 1.0}]
    (folder / "train_summary.json").write_text(json.dumps({
        "config": cfg.to_dict(), "final": {"test_acc": 0.41, "train_acc": 0.97},
        "train_labels": "noisy", "train_seconds": 12.5, "history": history,
    }))  # fmt: skip
    (folder / "summary.json").write_text(json.dumps({"analyze": {
        "accuracy": {"train": {"clean": 0.6, "noisy": 0.97}, "test": {"clean": 0.41}},
        "seconds": {"train": 2.0, "test": 1.0}, "device": "cpu",
    }}))  # fmt: skip
    Table([{"layer": 1, "kept": 3, "test_acc": 0.4, "note": EVIL}]).to_csv(folder / "prune.csv")
    return folder


def test_run_report_has_every_part(tmp_path):
    folder = make_run_folder(tmp_path / "run")
    path = write_report(folder)
    assert path == folder / "report.html"
    page = Page(path.read_text())
    text = " ".join(page.text)
    for heading in ("Overview", "Memorization layers", "Figures", "Per-layer table (layers.csv)",
                    "Pruning (prune.csv)", "Training history", "Config (config.yaml)"):  # fmt: skip
        assert heading in page.headings, heading
    assert "40% of the training labels shuffled" in text
    assert "0.97" in text and "12.5 s" in text  # accuracy on the noisy labels; timing
    # Δ = 8/l / (4/l) = 2 in blocks 3 and 4 (the last), 1 elsewhere: said in words.
    assert "blocks 3 (layer3.0), 4 (" in text and "the last blocks" in text
    assert EVIL in text and "b" not in page.tags and page.scripts == 1
    pngs = decoded_images(page)
    assert pngs and all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert len(list((folder / "figures").glob("layers-*.png"))) == 1


def test_report_flags_an_underfit_probe_and_a_wrecked_baseline_only_where_they_are(tmp_path):
    from nclayers.table import Table as T

    folder = make_run_folder(tmp_path / "run")  # probe 0.6 against NCC 0.7 on every block
    text = " ".join(Page(write_report(folder).read_text()).text)
    assert "probe below NCC: underfit; raise probe.epochs or widen probe.lrs" in text
    assert "layer1.0 (0.600 vs NCC 0.700)" in text and "baseline wrecked" not in text
    layers = T.from_csv(folder / "layers.csv")
    T({**r, "probe_acc": 0.69 if r["probe_acc"] else None} for r in layers).to_csv(
        folder / "layers.csv"
    )  # within 2 points
    rows = [{"variant": "none", "kind": "none", "finetune_epochs": e, "test_acc": a,
             "baseline_drop": 0.3 if e else None, "baseline_flag": bool(e) if e else None,
             "finetune_lr": 0.05 if e else None} for e, a in ((0, 0.8), (1, 0.5))]  # fmt: skip
    T(rows).to_csv(folder / "prune.csv")
    text = " ".join(Page(write_report(folder).read_text()).text)
    assert "probe below NCC" not in text
    assert "baseline wrecked: the unpruned model lost 30.0 points of test accuracy" in text


def test_report_verb_and_clear_errors(tmp_path, capsys):
    folder = make_run_folder(tmp_path / "run")
    assert main(["report", str(folder), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").is_file()
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no layers.csv" in capsys.readouterr().err


def chromium_dom(html_file: Path, profile: Path) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
           "--dump-dom", html_file.resolve().as_uri()]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_every_figure_loads_in_a_real_browser(tmp_path):
    folder = make_run_folder(tmp_path / "run")
    report = write_report(folder)
    n = len(Page(report.read_text()).images)
    assert n >= 1
    # A control page with one undecodable image: the marker must say so.
    broken = tmp_path / "broken.html"
    broken.write_text(render_html("x", [Section("x", figures=[Figure(PNG_1x1[:20])])]))
    dom = chromium_dom(report, tmp_path / "profile1")
    assert Page(dom).body.get("data-figures") == f"loaded {n}/{n}"
    dom = chromium_dom(broken, tmp_path / "profile2")
    assert Page(dom).body.get("data-figures") == "broken 0/1"


def test_report_redraws_a_figure_whose_data_changed(tmp_path):
    """A figure is named by the hash of the rows it draws: the same rows reuse it, other
    rows (even written within the same clock tick) get a new drawing and the old one
    goes; a cut drawing is drawn again, not inlined."""

    def layout(folder):
        (png,) = (folder / "figures").glob("layers-*.png")
        return png

    folder = make_run_folder(tmp_path / "run")
    write_report(folder)
    png = layout(folder)
    first = png.read_bytes()
    write_report(folder)
    assert layout(folder) == png and png.read_bytes() == first  # nothing changed
    rows = Table.from_csv(folder / "layers.csv")
    Table({**r, "nc1": r["nc1"] * 10} for r in rows).to_csv(folder / "layers.csv")
    write_report(folder)
    assert layout(folder) != png and layout(folder).read_bytes() != first
    png = layout(folder)
    png.write_bytes(first[: len(first) // 2])
    write_report(folder)
    assert png.read_bytes()[-8:-4] == b"IEND"


def test_a_stray_png_is_never_embedded(tmp_path):
    """A PNG the report did not draw from the rows it shows (an older `plot`, a copy) is
    left out of the report."""
    folder = make_run_folder(tmp_path / "run")
    import base64
    import re

    html = write_report(folder).read_text()
    png = re.findall(r'src="data:image/png;base64,([^"]+)"', html)[0]
    stray = folder / "nc1.png"
    stray.write_bytes(base64.b64decode(png))  # a whole PNG no stage drew
    html = write_report(folder).read_text()
    assert "nc1.png" not in html


def test_report_says_when_a_figure_cannot_be_read(tmp_path):
    """17.12: a noisy run that did not fit its changed labels: the report says Δ is not
    interpretable, and so does the figure's caption (drawn with the note)."""
    import json as _json

    folder = make_run_folder(tmp_path / "run")
    summary = _json.loads((folder / "train_summary.json").read_text())
    summary["label_noise"] = {"memorized": 0.11, "changed": 40, "rate": 0.4}
    (folder / "train_summary.json").write_text(_json.dumps(summary))
    text = " ".join(Page(write_report(folder).read_text()).text)
    assert "Δ not interpretable: the model fits 11% of its changed labels" in text
    from nclayers.jobs.report import readability

    clean = {"data": {"noise": None}}
    low = {"final": {"test_acc": 0.15}, "num_classes": 10}
    assert readability(clean, low) == [
        "NC curves of an undertrained model: test accuracy 15% (chance 10%); train longer "
        "before reading them"
    ]
    assert readability(clean, {"final": {"test_acc": 0.9}, "num_classes": 10}) == []
