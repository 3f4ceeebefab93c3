"""`orchestrator report`: one self-contained HTML file whose plots a real browser (headless Chromium) decodes."""
import base64
import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import hydra_value, write_prompts

EXE = shutil.which("orchestrator")
pytestmark = pytest.mark.skipif(EXE is None, reason="`pip install -e .` puts `orchestrator` on PATH")
PLOTS = ("throughput", "latency", "output_tokens", "errors")


def cli(*args, timeout=180):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout)


def chromium() -> str:
    """Debian's chromium (scripts/test.sh installs it); under CI=true a missing browser fails the test."""
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if not found:
        why = "no chromium: apt-get install -y --no-install-recommends chromium (scripts/test.sh does)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {why}")
        pytest.skip(why)
    return found


def headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report run")
    src = write_prompts(tmp / "in.parquet", 200)
    run_dir = tmp / "run 'a'"
    proc = cli("run", f"data.input={hydra_value(src)}", f"run_dir={hydra_value(run_dir)}",
               "engine.simulator.error_rate=0.2",
               "client.max_retries=0", "engine.protocol=openai", "client.max_in_flight=8", "data.unit_rows=50",
               "sampling.tokens_to_generate=8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    made = cli("report", str(run_dir))
    assert made.returncode == 0, made.stdout + made.stderr
    page = Path(made.stdout.strip())
    assert page == run_dir.resolve() / "report" / "report.html" and page.is_file()
    return page


def test_the_report_is_one_file_with_its_plots_embedded_and_beside_it(report):
    text = report.read_text()
    for name in PLOTS:
        match = re.search(rf'<img id="plot-{name}" alt="[^"]+" src="data:image/png;base64,([^"]+)"', text)
        assert match, f"no embedded {name} plot"
        png = base64.b64decode(match.group(1))
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and png == (report.parent / f"{name}.png").read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', text), "the page loads nothing from elsewhere"
    run_dir = report.parent.parent
    assert "tokens_to_generate: 8" in text and "error_rate: 0.2" in text  # the resolved config
    assert "<th>prompts_per_s</th>" in text and "<th>failed</th>" in text  # the summary as a table
    assert "HTTP 500" in text and html.escape(str(run_dir)) in text


def test_chromium_decodes_every_plot(report, tmp_path):
    browser = chromium()
    url = report.as_uri()
    dom = headless(browser, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'data-images-decoded="{len(PLOTS)}/{len(PLOTS)}"' in dom.stdout, dom.stdout[:500]
    shot = tmp_path / "shot.png"
    done = headless(browser, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1000,2400", url)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    inked = int((rgb != 255).any(axis=1).sum())
    r, g, b = rgb.T
    green = int(((g > 120) & (r < 90) & (b < 90)).sum())  # the output-token histogram's bars
    assert inked > 0.05 * len(rgb), f"{inked} of {len(rgb)} pixels are not white: the page looks blank"
    assert green > 2000, f"{green} green pixels: the output-token histogram did not render"
