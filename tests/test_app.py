"""The web app (app.py): started on a free localhost port as a user starts it, driven through gradio_client (sample,
cherry-pick, reconstruct, interpolate, swap, a bad input), and once in a real headless browser (Debian's chromium
and chromium-driver through selenium): the page loads, a click on Sample produces an image, the screenshot is not
blank. Skipped where gradio (or the browser) is not installed; CI installs them."""
from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, free_port, run

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def served():
    """app.py with the shipped digits model on a free port: its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--device", "cpu"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py ended with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("app.py did not start listening within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def png(path, formats=("PNG", "GIF")) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format in formats
        return np.asarray(img.convert("L"), dtype=float)


def shown(gallery_item) -> np.ndarray:
    """A gallery image as the page shows it (Gradio re-encodes gallery images, as WebP)."""
    return png(gallery_item["image"], formats=("PNG", "WEBP"))


def test_the_app_samples_cherry_picks_and_runs_every_mode(served):
    from gradio_client import Client

    client = Client(served, verbose=False)
    grid = png(client.predict("3", 4, 0, 1.0, False, 1.0, 1.0, 1.0, 0.0, api_name="/sample"))
    assert grid.std() > 10
    per_res = png(client.predict("3", 4, 0, 1.0, True, 1.0, 0.5, 0.1, 0.0, api_name="/sample"))
    assert per_res.shape == grid.shape and not np.array_equal(per_res, grid)  # the sliders reach the sampler

    pool, status = client.predict("7", 1.0, 0, api_name="/draw")
    assert len(pool) == 9 and status == "kept 0 of 9"
    client.predict(3, api_name="/target")
    for index in (8, 0, 4):
        kept, status = client.predict(index, api_name="/keep")
    assert len(kept) == 3 and status == "kept 3 of 3"
    with pytest.raises(Exception, match="the selection is full"):
        client.predict(1, api_name="/keep")
    before = [shown(k) for k in kept]
    kept, _ = client.predict("2,0,1", api_name="/reorder")
    after = [shown(k) for k in kept]
    assert all(np.array_equal(a, before[b]) for a, b in zip(after, (2, 0, 1)))
    preview, download = client.predict(api_name="/export")
    final = png(download)
    assert np.array_equal(final, png(preview)) and final.shape[1] > final.shape[0] / 2  # one row of three

    assert png(client.predict(3, "", 0, api_name="/recon")).std() > 10
    strip, gif = client.predict("two held-out images", "3,17", 5, 0, api_name="/interp")
    assert png(strip).std() > 10 and Image.open(gif).n_frames == 5
    assert png(client.predict(2, "1,2", 0, api_name="/swap")).std() > 10
    with pytest.raises(Exception, match="index 999999 is out of range 0..359 of the test split"):
        client.predict("two held-out images", "3,999999", 5, 0, api_name="/interp")


def test_a_manifold_tab_exactly_for_models_with_a_2d_latent(tmp_path):
    """Built in process (no server): the tab's endpoint draws sample.py manifold's picture for a 2-D cvae, and the
    page of the shipped vdvae has no such tab."""
    import app
    import sample
    import train
    from conftest import tiny_cli_args

    run_dir = tmp_path / "cvae2d"
    train.main(tiny_cli_args(run_dir, model="cvae", zdim=2, conv_width=8, width=16, max_steps=2))
    cvae_app = app.App(str(run_dir), "cpu")
    endpoints = lambda page: {f.api_name for f in page.fns.values()}  # noqa: E731
    assert "manifold" in endpoints(app.build_page(cvae_app))
    assert "manifold" not in endpoints(app.build_page(app.App(str(ROOT / "weights" / "digits.safetensors"), "cpu")))
    shown_picture = png(cvae_app.manifold("7", 4, 2, 1.0))
    sample.main(["manifold", "--weights", str(run_dir), "--class", "7", "--n", "4", "--draws", "2",
                 "--out", str(tmp_path / "cli.png")])
    assert np.array_equal(shown_picture, png(tmp_path / "cli.png"))  # the page's picture is the command line's


def test_bad_weights_are_one_line_before_serving(tmp_path):
    result = run("app.py", "--weights", str(tmp_path / "none.safetensors"), "--port", str(free_port()))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: weights file {tmp_path / 'none.safetensors'} does not "
                                                   f"exist; weights come from the digits model shipped in"), lines


def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromium-driver are not installed (apt install chromium chromium-driver)")
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_a_real_browser_loads_the_page_and_a_click_draws_samples(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        driver.get(served)
        wait = WebDriverWait(driver, 90)
        button = wait.until(ec.element_to_be_clickable((By.ID, "sample-button")))
        assert not driver.find_elements(By.CSS_SELECTOR, "#sample-output img")
        button.click()
        image = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#sample-output img")))
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
        shot = driver.get_screenshot_as_png()
        (tmp_path / "app.png").write_bytes(shot)
        pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=float)
        assert pixels.std() > 10  # a drawn page, not a blank one
        box = image.screenshot_as_png  # the samples themselves: dark digits on light, or the reverse
        assert np.asarray(Image.open(io.BytesIO(box)).convert("L"), dtype=float).std() > 20
    finally:
        driver.quit()
