"""The HTML report (``spa-harness report RESULTS --out FILE.html``, harness/report/command.py and render.py)
in a real browser: headless Chromium loads a report of a synthetic store (3 seeds, the dense
baseline and six SPA variants, so the tables are full-width); every image must have loaded and the
page must fit a 1400 px window without sideways scrolling. A probe script, added to a copy of the
report only, writes what the page measured into ``document.title``; ``--dump-dom`` prints it.

The screenshot stays in the test's tmp_path, or goes to ``test-artifacts/report.png`` at the repo
root when ``SPA_TEST_ARTIFACTS`` is set. Chromium: Debian's ``chromium`` (installed with apt-get when
missing; the test is skipped, saying why, only if that fails)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.cli import main
from harness.results import ResultsStore
from tests.harness._helpers import DEFAULT_VARIANTS, result_row

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
WIDTH = 1400

PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const main = document.querySelector("table");
  document.title = JSON.stringify({
    images: images.length,
    broken: images.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.alt),
    scrollWidth: document.documentElement.scrollWidth,
    clientWidth: document.documentElement.clientWidth,
    scrollHeight: document.documentElement.scrollHeight,
    innerWidth: window.innerWidth,
    mainTableRight: main ? main.getBoundingClientRect().right : null,
    tablesRight: Math.max(...Array.from(document.querySelectorAll("table"), (t) => t.getBoundingClientRect().right)),
    tables: document.querySelectorAll("table").length,
  });
});
</script>
"""


def _store(path: Path, seeds: int = 3) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for s in range(seeds):
        base = 0.40 + rng.normal(0.0, 0.02)
        rows.append(result_row("dense", s, map=base, map_50=base + 0.2, gmacs=2.0, backbone_gmacs=1.2,
                               infer_ms=10.0 + s, kept_fraction=1.0, peak_mem_mb=120.0))  # fmt: skip
        for name, (sel, ratio, effect) in DEFAULT_VARIANTS.items():
            m = base + effect + rng.normal(0.0, 0.003)
            rows.append(result_row(name, s, sel, ratio, map=m, map_50=m + 0.2, gmacs=2.0 * (0.5 + ratio / 2),
                                   backbone_gmacs=1.2 * (0.4 + ratio / 2), infer_ms=9.0 + s,
                                   speedup_vs_dense=1.1 + 0.01 * s, speedup_vs_dense_q1=1.05,
                                   speedup_vs_dense_q3=1.15, kept_fraction=ratio, gate_precision=0.7,
                                   gate_recall=0.8, peak_mem_mb=110.0))  # fmt: skip
    exp = ResultsStore(str(path)).experiment("browser")
    exp.write_manifest({"name": "browser", "source": None})
    for row in pd.DataFrame(rows).to_dict("records"):
        exp.write_row(row["config_hash"], row)
    return path / "browser"


def _chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    try:
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"chromium is not installed and `apt-get install chromium` failed: {e}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium is not installed and `apt-get install chromium` did not provide it")
    return found


def _run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
           "--no-first-run", "--allow-file-access-from-files", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True)


def test_html_report_renders_in_chromium(tmp_path):
    chromium = _chromium()
    page = tmp_path / "web" / "report.html"
    assert main(["report", str(_store(tmp_path / "store")), "--out", str(page)]) == 0
    shipped = page.read_text()
    assert "<script" not in shipped  # the probe is only in the test's copy

    probed = tmp_path / "web" / "probed.html"
    probed.write_text(shipped.replace("</body>", PROBE + "</body>"))
    dom = _run_chromium(chromium, tmp_path / "profile", f"--window-size={WIDTH},1000", "--virtual-time-budget=10000",
                        "--dump-dom", probed.as_uri()).stdout  # fmt: skip
    title = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert title is not None, dom[:2000]
    seen = json.loads(html.unescape(title.group(1)))

    assert seen["images"] >= 4 and seen["broken"] == [], seen  # Pareto, one per axis, speedup, gate
    assert seen["tables"] >= 3, seen
    assert seen["innerWidth"] == WIDTH, seen
    assert seen["scrollWidth"] <= WIDTH and seen["scrollWidth"] <= seen["clientWidth"], (
        seen
    )  # no sideways scroll
    assert seen["mainTableRight"] <= seen["clientWidth"] and seen["tablesRight"] <= seen["clientWidth"], seen

    shot = tmp_path / "report.png"  # the whole page, as long as it is (up to 8000 px)
    height = min(8000, int(seen["scrollHeight"]) + 20)
    _run_chromium(chromium, tmp_path / "profile", f"--window-size={WIDTH},{height}", "--hide-scrollbars",
                  "--virtual-time-budget=10000", f"--screenshot={shot}", page.as_uri())  # fmt: skip
    assert shot.stat().st_size > 10_000
    if os.environ.get("SPA_TEST_ARTIFACTS"):
        out = ROOT / "test-artifacts"
        out.mkdir(exist_ok=True)
        shutil.copyfile(shot, out / "report.png")
