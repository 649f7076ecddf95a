"""The web playground in a real browser: headless Chromium from the system's packages, driven by
Playwright, against the server with the tiny model over loopback."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from .conftest import RunningServer, ServerFactory

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Records the status line's every text and counts the result images' changes of picture.
WATCH = """() => {
    const status = document.getElementById('status');
    window.statuses = [];
    new MutationObserver(() => window.statuses.push(status.textContent))
        .observe(status, {childList: true, characterData: true, subtree: true});
    window.imageChanges = 0;
    new MutationObserver((records) => { window.imageChanges += records.length; })
        .observe(document.getElementById('results'),
                 {attributes: true, attributeFilter: ['src'], subtree: true});
}"""
# Where to keep a picture of the page after a generation (docs/playground.png is one).
SCREENSHOT = os.environ.get("ZIMAGE_PLAYGROUND_SCREENSHOT")


def test_the_page_and_its_assets_come_from_the_server_with_a_strict_policy(server: RunningServer) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    assert "http" not in page.text.replace("http-equiv", ""), "no absolute URL: nothing from elsewhere"
    for asset, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = httpx.get(f"{server.url}/playground/{asset}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(kind)
        assert "://" not in response.text
    total = len(page.content) + sum(
        len(httpx.get(f"{server.url}/playground/{a}").content) for a in ("app.js", "style.css")
    )
    assert total < 40_000, f"the page weighs {total} bytes"
    config = httpx.get(server.url + "/playground/config").json()
    assert config["sizes"][0] == "256x256", "the warm-up size first"
    assert "1024x1024" in config["sizes"]
    assert config["auth"] is False


def test_the_playground_can_be_turned_off(serve: ServerFactory) -> None:
    server = serve(playground=False)
    for path in ("/", "/playground/app.js", "/playground/config"):
        response = httpx.get(server.url + path)
        assert response.status_code == 404
        assert "error" in response.json()
    assert httpx.get(server.url + "/healthz/ready").status_code == 200


@pytest.fixture
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (make browser installs it from the Debian packages)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # No sandbox: the tests may run as root, where Chromium refuses its sandbox. Every host
        # name fails to resolve, so nothing could reach past loopback even by mistake.
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
        )
        try:
            yield browser
        finally:
            browser.close()


class Page:
    """A browser page on the server that records every request it makes."""

    def __init__(self, browser: Any, server: RunningServer) -> None:
        self.context = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 800})
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(server.url + "/")
        self.page.wait_for_selector("#size option", state="attached")
        self.page.evaluate(WATCH)

    def hosts(self) -> set[str]:
        return {urlsplit(url).hostname or "" for url in self.requests if url.startswith("http")}


def test_a_generation_shows_progress_then_the_image_and_downloads_it(
    browser: Any, server: RunningServer, tmp_path: Path
) -> None:
    view = Page(browser, server)
    page = view.page
    page.fill("#prompt", "a red fox in the snow")
    page.select_option("#size", "256x256")
    page.fill("#steps", "8")
    page.fill("#seed", "42")
    page.select_option("#partials", "2")
    page.click("#generate")
    link = page.locator("figure a")
    link.wait_for(state="visible", timeout=120_000)

    statuses: list[str] = page.evaluate("window.statuses")
    assert any(text.startswith("step ") for text in statuses), statuses
    assert "step 8 of 8" in statuses
    assert page.text_content("#status") == "done"
    # Two previews, then the image: the picture changed three times.
    assert page.evaluate("window.imageChanges") == 3
    assert page.text_content("figcaption span") == "seed 42"

    with page.expect_download() as download:
        link.click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == "zimage-42.png"
    image = Image.open(io.BytesIO(saved.read_bytes()))
    assert (image.format, image.size) == ("PNG", (256, 256))
    same = httpx.post(
        server.url + "/generate",
        json={"prompt": "a red fox in the snow", "size": "256x256", "num_inference_steps": 8, "seed": 42},
        timeout=120,
    )
    assert same.content == saved.read_bytes(), "the page's image is the API's image for that seed"

    # The history remembers it, across a reload.
    page.reload()
    page.wait_for_selector("#history li")
    assert "a red fox in the snow" in page.text_content("#history li")
    page.fill("#prompt", "")
    page.click("#history li")
    assert page.input_value("#prompt") == "a red fox in the snow"
    assert page.input_value("#seed") == "42"

    if SCREENSHOT:
        page.fill("#prompt", "a red fox in the snow")
        page.click("#generate")
        page.locator("figure a").wait_for(state="visible", timeout=120_000)
        page.screenshot(path=SCREENSHOT)
    assert view.errors == []
    assert view.hosts() == {"127.0.0.1"}, f"requests left loopback: {view.requests}"


def test_an_invalid_size_shows_the_servers_message(browser: Any, server: RunningServer) -> None:
    view = Page(browser, server)
    page = view.page
    page.fill("#prompt", "a fox")
    page.select_option("#size", "custom")
    page.fill("#custom-size", "100x96")
    page.click("#generate")
    page.wait_for_selector("#status.error")
    expected = httpx.post(
        server.url + "/v1/images/generations", json={"prompt": "a fox", "size": "100x96"}, timeout=30
    ).json()["error"]["message"]
    assert page.text_content("#status") == expected
    assert "16" in expected
    assert page.locator("figure").count() == 0
    assert view.hosts() == {"127.0.0.1"}


def test_the_api_key_is_asked_once_and_kept(browser: Any, serve: ServerFactory) -> None:
    server = serve(api_keys="sk-playground-1")
    view = Page(browser, server)
    page = view.page
    assert page.is_visible("#api-key")
    page.fill("#prompt", "a fox")
    page.select_option("#size", "256x256")
    page.fill("#steps", "2")
    page.select_option("#partials", "0")
    page.click("#generate")
    page.wait_for_selector("#status.error")
    assert "API key" in page.text_content("#status")

    page.fill("#api-key", "sk-playground-1")
    page.dispatch_event("#api-key", "change")
    page.click("#generate")
    page.locator("figure a").wait_for(state="visible", timeout=120_000)
    page.reload()
    page.wait_for_selector("#size option", state="attached")
    assert page.input_value("#api-key") == "sk-playground-1", "kept in the browser"
    page.click("#forget-key")
    assert page.evaluate("localStorage.getItem('zimage.apiKey')") is None
    assert view.hosts() == {"127.0.0.1"}


def test_the_adapter_picker_sends_the_adapter_and_its_scale(
    browser: Any, serve: ServerFactory, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from .lora_files import make_adapter

    loras = [
        {
            "name": "pixel",
            "source": str(make_adapter(tiny_model_dir, tmp_path / "pixel", seed=1)),
            "scale": 0.8,
        },
        {"name": "ink", "source": str(make_adapter(tiny_model_dir, tmp_path / "ink", seed=2))},
    ]
    server = serve(loras=loras)
    view = Page(browser, server)
    page = view.page
    assert page.is_visible("#adapter")
    assert [o for o in page.eval_on_selector_all("#adapter option", "os => os.map(o => o.value)")] == [
        "",
        "pixel",
        "ink",
    ]
    page.select_option("#adapter", "pixel")
    assert page.input_value("#adapter-scale") == "0.8", "the adapter's own scale first"
    page.fill("#adapter-scale", "0.5")
    page.dispatch_event("#adapter-scale", "input")
    assert page.text_content("#adapter-scale-value") == "0.50"
    page.fill("#prompt", "a red fox")
    page.select_option("#size", "256x256")
    page.fill("#steps", "2")
    page.fill("#seed", "5")
    page.select_option("#partials", "0")
    page.click("#generate")
    link = page.locator("figure a")
    link.wait_for(state="visible", timeout=120_000)
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "shown.png"
    download.value.save_as(saved)
    shown = saved.read_bytes()
    body = {"prompt": "a red fox", "size": "256x256", "num_inference_steps": 2, "seed": 5}
    with_adapter = httpx.post(
        server.url + "/generate", json={**body, "lora": [{"name": "pixel", "scale": 0.5}]}, timeout=60
    )
    without = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert shown == with_adapter.content, "the page's image is the API's with pixel at 0.5"
    assert shown != without.content
    # Restored from the history with its adapter.
    page.select_option("#adapter", "")
    page.click("#history li")
    assert page.input_value("#adapter") == "pixel"
    assert page.input_value("#adapter-scale") == "0.5"
    assert view.errors == []
    assert view.hosts() == {"127.0.0.1"}


def test_without_adapters_the_picker_is_hidden(browser: Any, server: RunningServer) -> None:
    view = Page(browser, server)
    assert not view.page.is_visible("#adapter-row")


def test_the_edit_mode_sends_the_image_and_the_painted_mask(
    browser: Any, server: RunningServer, tmp_path: Path
) -> None:
    import numpy as np

    source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8), "RGB")
    path = tmp_path / "in.png"
    source.save(path)
    view = Page(browser, server)
    page = view.page
    page.select_option("#mode", "edit")
    assert page.is_visible("#edit-row")
    assert page.input_value("#size") == "auto"
    page.set_input_files("#edit-image", str(path))
    page.wait_for_selector("#edit-canvas", state="visible")
    # Paint a stroke across the middle of the picture.
    box = page.locator("#edit-canvas").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    page.fill("#prompt", "a red boat")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    page.select_option("#partials", "1")
    page.click("#generate")
    link = page.locator("figure a")
    link.wait_for(state="visible", timeout=120_000)
    assert page.text_content("#status") == "done"
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "out.png"
    download.value.save_as(saved)
    edited = np.asarray(Image.open(saved).convert("RGB"), dtype=np.int16)
    original = np.asarray(source, dtype=np.int16)
    changed = np.abs(edited - original).max(axis=2) > 1
    assert edited.shape == original.shape, "the image's own size"
    # Inpainted: the stroke's band changed, the corners (never painted) did not.
    assert changed[118:138, 110:146].mean() > 0.5
    assert not changed[:40, :40].any()
    assert not changed[-40:, -40:].any()
    assert page.evaluate("window.imageChanges") == 2  # the preview, then the image
    assert view.errors == []
    assert view.hosts() == {"127.0.0.1"}
