"""The Gradio demo (`attnlab demo`): its tab functions directly, its HTTP API through gradio_client, and every
tab driven in a real headless Chromium (Debian `chromium` + Python playwright with the system executable).
The browser test also saves the README's screenshots to docs/images/demo_*.png when ATTNLAB_SCREENSHOTS=1."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from attnlab.demo import runs

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "images"

def test_runs_validate_input_before_work():
    store = runs.ModelStore()
    with pytest.raises(ValueError, match="prompt is empty"):
        runs.run_softpag(store, "tiny-sd15", "  ", "", 3.0, 1.0, 2, 0)
    with pytest.raises(ValueError, match="steps"):
        runs.run_entropy(store, "tiny-sd15", "x", 2.0, 0, 0)
    with pytest.raises(ValueError, match="resolution"):
        runs.run_entropy(store, "tiny-sd15", "x", 9.0, 2, 0)
    with pytest.raises(ValueError, match="upload an image"):
        runs.run_refam(store, "tiny-sd15", None, "the dog", 0.5, "drop")
    img, _ = runs.toy_scene(1)
    with pytest.raises(ValueError, match="mask is empty"):
        runs.run_eraser(store, "tiny-sd15", {"background": np.asarray(img), "layers": []}, 9.0, 2, 0)
    with pytest.raises(ValueError, match="choose a model"):
        store.get(" ")
    with pytest.raises(ValueError):
        store.get("tiny-nope")


def test_eraser_scene_arrives_with_its_first_object_painted_over():
    from attnlab.toyworld.scenes import ground_truth, sample_scene

    value = runs.eraser_scene(1)
    image, mask = runs.editor_mask(value)
    obj = ground_truth(sample_scene(1, n_objects=2), 64)[0]["mask"]
    painted = np.asarray(mask) > 0
    assert image.size == mask.size == (64, 64)
    assert painted[obj].all() and painted.sum() < 3 * obj.sum()  # the object and a thin margin, not the scene
    assert (value["layers"][0][..., 3] > 0).sum() == painted.sum()
    assert value["composite"].shape == value["background"].shape == (64, 64, 3)


def test_alignedgen_and_freeswim_tabs():
    store = runs.ModelStore()
    plain, aligned, info = runs.run_alignedgen(store, "tiny-sd15", "a red circle\na blue square\na star", 2, 0)
    assert len(plain) == len(aligned) == 3 and aligned[1][1] == "a blue square"
    assert np.asarray(plain[1][0]).tolist() != np.asarray(aligned[1][0]).tolist()  # targets change, reference may not
    with pytest.raises(ValueError, match="at least 2 prompts"):
        runs.run_alignedgen(store, "tiny-sd15", "one prompt", 2, 0)
    direct, swum, info = runs.run_freeswim(store, "tiny-flux", "a red circle", 2.0, 2, 0)
    assert direct.size == swum.size == (128, 128) and "FreeSwim" in info
    direct, swum, info = runs.run_freeswim(store, "tiny-sd15", "a red circle", 2.0, 2, 0)  # SD1.5: img2img stage 2
    assert direct.size == swum.size == (128, 128)
    with pytest.raises(ValueError, match="FreeSwimPipeline drives"):
        runs.run_freeswim(store, "tiny-pixart", "a red circle", 2.0, 2, 0)
    with pytest.raises(ValueError, match="target size"):
        runs.run_freeswim(store, "tiny-flux", "a red circle", 1.0, 2, 0)


def test_runs_produce_images_and_one_lock_per_model():
    store = runs.ModelStore()
    seen = []
    off, on, info = runs.run_softpag(store, "tiny-sd15", "a red circle", "m0", 3.0, 1.0, 2, 0,
                                     progress=lambda f, d: seen.append((f, d)))
    assert off.size == on.size == (64, 64) and "extra forwards" in info
    assert seen and seen[-1][0] == pytest.approx(1.0) and all(0 < f <= 1 for f, _ in seen)
    assert np.asarray(off).tolist() != np.asarray(on).tolist()
    img, expr = runs.toy_scene(2)
    overlay, mask, heat, info = runs.run_refam(store, "tiny-sd15", img, expr, 0.5, "drop")
    assert overlay.size == mask.size == heat.size == img.size and "content words" in info
    bg = np.asarray(img)
    layer = np.zeros(bg.shape[:2] + (4,), np.uint8)
    layer[16:40, 16:40, 3] = 255
    inp, before, after, info = runs.run_eraser(store, "tiny-sd15", {"background": bg, "layers": [layer]}, 9.0, 2, 0)
    assert before.size == after.size and np.asarray(before).tolist() != np.asarray(after).tolist()
    assert store.get("tiny-sd15") is store.get("tiny-sd15")
    with pytest.raises(ValueError, match="SD1.5/SDXL"):
        runs.run_eraser(store, "tiny-flux", {"background": bg, "layers": [layer]}, 9.0, 2, 0)


def test_concurrent_users_get_their_own_results():
    """Two users on one model at once (SoftPAG installs effects on the shared denoiser for its run): each gets
    exactly what it would get alone."""
    import threading

    store = runs.ModelStore()
    alone = [runs.run_softpag(store, "tiny-sd15", p, "m0", w, 1.0, 2, 0)[1] for p, w in (("a red circle", 3.0),
                                                                                          ("a blue star", 0.0))]
    got = [None, None]

    def user(i, prompt, w):
        got[i] = runs.run_softpag(store, "tiny-sd15", prompt, "m0", w, 1.0, 2, 0)[1]

    threads = [threading.Thread(target=user, args=(0, "a red circle", 3.0)),
               threading.Thread(target=user, args=(1, "a blue star", 0.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, got):
        assert np.asarray(a).tolist() == np.asarray(b).tolist()


# --- the running app ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("gradio")
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT.parent) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "attnlab.demo", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the demo exited:\n" + proc.stdout.read())
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("the demo did not answer within 120 s")
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.browser
def test_api_client(server):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    off, on, info = client.predict("tiny-sd15", "a red circle", "m0", 3.0, 1.0, 2, 0, api_name="/softpag")
    plain, aligned, info2 = client.predict("tiny-sd15", "a red circle\na blue square", 2, 0, api_name="/alignedgen")
    assert len(plain) == len(aligned) == 2 and "aligned batch" in info2
    assert Path(off).is_file() and Path(on).is_file() and "extra forwards" in info
    image, expr = client.predict(3, api_name="/toy_scene")
    overlay, mask, heat, info = client.predict("tiny-sd15", handle_file(image), expr, 0.5, "drop", api_name="/refam")
    assert Path(overlay).is_file() and "content words" in info
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("tiny-sd15", " ", "m0", 3.0, 1.0, 2, 0, api_name="/softpag")


def _browser(p):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium (apt-get install -y chromium)")
    return p.chromium.launch(executable_path=exe, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"])


def _shot(page, name):
    if os.environ.get("ATTNLAB_SCREENSHOTS") == "1":
        # galleries fill asynchronously: a shot taken before their images decode shows blank tiles
        page.wait_for_function("() => Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
                               timeout=30_000)
        page.screenshot(path=str(SHOTS / f"demo_{name}.png"), full_page=True)


def _wait_value(page, selector, text, timeout=120_000):
    """Wait until the input/textarea at `selector` contains `text`."""
    from playwright.sync_api import expect

    expect(page.locator(selector)).to_have_value(re.compile(re.escape(text)), timeout=timeout)


@pytest.mark.browser
def test_every_tab_in_a_real_browser(server):
    pw = pytest.importorskip("playwright.sync_api")
    with pw.sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server)
        page.wait_for_selector("#sp-run")

        # SoftPAG: the head picker is filled from the model; generate off/on, see progress and both images
        from playwright.sync_api import expect

        expect(page.locator("#sp-heads input")).not_to_have_value("", timeout=60_000)
        page.fill("#sp-prompt textarea", "a large green triangle on a plain white background")
        page.click("#sp-run")
        _wait_value(page, "#sp-info textarea", "extra forwards")
        assert page.locator("#sp-0 img").count() == 1 and page.locator("#sp-1 img").count() == 1
        _shot(page, "softpag")

        # RefAM: make a toy scene, segment it
        page.get_by_role("tab", name="RefAM").click()
        page.click("#ra-scene")
        page.locator("#ra-image img").first.wait_for(timeout=60_000)
        page.click("#ra-run")
        _wait_value(page, "#ra-info textarea", "content words")
        assert page.locator("#ra-0 img").count() == 1 and page.locator("#ra-1 img").count() == 1
        _shot(page, "refam")

        # Attentive Eraser: load a scene (it arrives with its first object painted over in the editor), erase
        page.get_by_role("tab", name="Attentive Eraser").click()
        page.click("#er-scene")
        page.locator("#er-editor canvas").first.wait_for(timeout=60_000)
        for attempt in range(3):  # the editor may still be loading the scene on a busy machine: run again
            page.wait_for_timeout(1500 * (attempt + 1))
            missing = page.get_by_text(re.compile("upload an image|the mask is empty"))
            before = missing.count()
            page.click("#er-run")
            deadline = time.time() + 120
            while time.time() < deadline:
                if "extra forwards" in page.locator("#er-info textarea").input_value() or missing.count() > before:
                    break
                page.wait_for_timeout(500)
            if missing.count() == before:
                break
        _wait_value(page, "#er-info textarea", "extra forwards")
        assert page.locator("#er-2 img").count() == 1
        _shot(page, "eraser")

        # Entropy scaling: resolution slider, off/on
        page.get_by_role("tab", name="Entropy scaling").click()
        page.click("#en-run")
        _wait_value(page, "#en-info textarea", "λ per layer")
        _shot(page, "entropy")

        # AlignedGen: a prompt list -> the plain and the aligned gallery
        page.get_by_role("tab", name="AlignedGen").click()
        page.click("#ag-run")
        _wait_value(page, "#ag-info textarea", "aligned batch")
        assert page.locator("#ag-1 img").count() >= 3
        _shot(page, "alignedgen")

        # FreeSwim on the default toy-sd (stage 2 is img2img for UNet models): target size -> both results
        page.get_by_role("tab", name="FreeSwim").click()
        page.click("#fs-run")
        _wait_value(page, "#fs-info textarea", "FreeSwim (both stages)")
        assert page.locator("#fs-1 img").count() == 1
        _shot(page, "freeswim")
        # another model typed into the model box is the one that runs (tiny-flux's native size is 64×64)
        page.locator("#model input").fill("tiny-flux")
        page.locator("#model input").press("Enter")
        page.click("#fs-run")
        _wait_value(page, "#fs-info textarea", "native 64×64")

        # bad input shows a message, not a stack trace
        page.get_by_role("tab", name="SoftPAG").click()
        page.fill("#sp-prompt textarea", " ")
        page.click("#sp-run")
        page.get_by_text("the prompt is empty").first.wait_for(timeout=60_000)
        browser.close()
