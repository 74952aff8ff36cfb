"""A real browser: Jupyter on localhost, explore.ipynb opened in headless Chromium, all cells run,
the image selector dragged, and the heatmap on screen must change.

Debian's chromium (/usr/bin/chromium), driven by Playwright with executable_path: no browser
download. scripts/test.sh installs both when it can; without them this test is skipped, and
pytest's summary says why. The screenshot of the browser lands in the test's tmp folder, and in
$S11_SCREENSHOT_DIR too when that is set (that is how images/explore-browser.png is made).
"""
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import papermill as pm
import pytest

pytestmark = pytest.mark.slow  # a Jupyter server and headless Chromium
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "explore.ipynb"
# The flags that work on these machines (closed network, root, no GPU, no screen).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyter(tmp_path):
    """A Jupyter server on localhost serving tmp_path; yields (base url, token)."""
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / ".config"), JUPYTER_RUNTIME_DIR=str(tmp_path / ".runtime"))
    log = open(tmp_path / "jupyter.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "notebook", "--no-browser", "--allow-root", "--ip=127.0.0.1",
         f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"jupyter did not start: {(tmp_path / 'jupyter.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield url, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _dismiss_dialogs(page) -> None:
    """Print, then accept, any modal dialog Jupyter opened (it would swallow the clicks)."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count():
        print("jupyter dialog:", " | ".join(dialog.first.inner_text().split("\n")))
        dialog.first.locator(".jp-mod-accept").first.click()


def _run_all_cells(page) -> None:
    """Run > Run All Cells from the menu, as a user does. A click before the kernel is connected
    is lost, and a dialog Jupyter opens meanwhile swallows clicks, so try again until a cell shows
    that it ran ("[1]:"; the first, the Colab cell, takes no time outside Colab). "[*]:" is not
    enough: the server sometimes starts two kernels for the page and shuts one down at once, and
    cells sent to that one stay at "[*]" for ever (seen once in CI on 2026-12-04: nothing ran)."""
    started = "() => [...document.querySelectorAll('.jp-InputPrompt')].some(p => /\\[\\d+\\]/.test(p.textContent))"
    for _ in range(8):
        _dismiss_dialogs(page)
        try:
            page.get_by_text("Run", exact=True).first.click(timeout=5_000)
            page.get_by_text("Run All Cells", exact=True).click(timeout=5_000)
            page.wait_for_function(started, timeout=10_000)
            return
        except Exception:  # noqa: BLE001 - playwright's TimeoutError: not connected yet, or a dialog
            page.keyboard.press("Escape")
    pytest.fail("the notebook never started running")


def test_dragging_the_selector_changes_the_heatmap_on_screen(jupyter, learned_run, data_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (scripts/test.sh does)")
    if not Path(CHROMIUM).exists():
        pytest.skip("no Debian chromium at /usr/bin/chromium (scripts/test.sh installs it when run as root)")
    url, token = jupyter
    pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "explore.ipynb"), prepare_only=True, kernel_name="python3",
                        parameters=dict(run_dir=str(learned_run.out_dir), data_dir=str(data_dir), device="cpu"))

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        try:
            page.goto(f"{url}/notebooks/explore.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            _run_all_cells(page)

            picture = page.locator("img.widget-image").first
            picture.wait_for(timeout=180_000)
            caption = page.locator(".widget-html-content", has_text="test image").first
            caption.wait_for(timeout=30_000)
            first_caption, first_pixels = caption.inner_text(), picture.screenshot()

            handle = page.locator(".widget-slider .noUi-handle").first  # the mistake selector
            box = handle.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] + 60, box["y"] + box["height"] / 2, steps=6)
            page.mouse.up()
            page.wait_for_function("old => !document.body.innerText.includes(old)",
                                   arg=first_caption.split(":")[0] + ":", timeout=60_000)

            second_caption, second_pixels = caption.inner_text(), picture.screenshot()
            assert second_caption != first_caption and second_caption.startswith("test image ")
            assert second_pixels != first_pixels  # the image and its heatmaps on screen changed

            widget = page.locator(".widget-vbox:has(img.widget-image)").first
            widget.scroll_into_view_if_needed()
            widget.screenshot(path=str(tmp_path / "explore-browser.png"))
        finally:
            page.screenshot(path=str(tmp_path / "explore-page.png"))  # also when it failed: what was on screen
            browser.close()
    if os.environ.get("S11_SCREENSHOT_DIR"):
        shutil.copy(tmp_path / "explore-browser.png", Path(os.environ["S11_SCREENSHOT_DIR"]) / "explore-browser.png")
