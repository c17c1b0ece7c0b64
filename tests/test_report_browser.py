"""The HTML report in a real browser: headless Chromium renders it offline and the plots are visible."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import qcompile

CHROMIUM = "/usr/bin/chromium"
WINDOW = (1200, 3000)


def _chromium() -> str:
    """Chromium's path, installed with apt-get when missing; the test is skipped if that fails."""
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if found:
        return found
    problems = []
    for command in (["apt-get", "install", "-y", "chromium"], ["apt-get", "update"],
                    ["apt-get", "install", "-y", "chromium"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                                  env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"{' '.join(command)}: {exc}")
            continue
        if done.returncode != 0:
            problems.append(f"{' '.join(command)}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
        if Path(CHROMIUM).exists():
            return CHROMIUM
    pytest.skip(f"headless Chromium is not installed and `apt-get install -y chromium` failed ({'; '.join(problems)})")


def _browser(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_renders_with_visible_plots_in_headless_chromium(tmp_path, mlp_path):
    chromium = _chromium()
    report = tmp_path / "report.html"
    qcompile.compile(mlp_path, passes="quant(bits=4)", calib="random:4", output=tmp_path / "out", report=report)
    url = report.resolve().as_uri()

    dom = _browser(chromium, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('<img alt="') == 3 and dom.stdout.count('src="data:image/png;base64,') == 3
    assert "Bits and error per layer" in dom.stdout

    screenshot = tmp_path / "report.png"
    shot = _browser(chromium, tmp_path / "profile", f"--screenshot={screenshot}",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}", url)
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(screenshot).convert("RGB"), np.int16)
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    # The page itself is black, grey and white; colour comes only from the plots' bars.
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    coloured = pixels[saturation > 60]
    assert len(coloured) > 20_000, f"only {len(coloured)} coloured pixels: are the plots drawn?"
    distinct = {tuple(p) for p in coloured[:: max(1, len(coloured) // 50_000)]}
    assert len(distinct) > 20, f"{len(distinct)} distinct colours"
    rows = np.flatnonzero((saturation > 60).any(axis=1))
    assert rows.max() - rows.min() > 600, "the plots should span a good part of the page"
