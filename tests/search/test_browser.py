"""The web page in a real browser: headless Chromium driven by Selenium against a server on 127.0.0.1.

Skipped, with the reason, when Chromium, its driver or Selenium is missing (``.ci/run`` installs them).
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="Selenium is not installed (pip install selenium)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("headless Chromium is not installed: apt-get install chromium chromium-driver", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from clipforge.interop.load import load_checkpoint  # noqa: E402
from clipforge.search.app import create_app  # noqa: E402
from clipforge.search.embed import embed_images  # noqa: E402
from clipforge.search.index import Index  # noqa: E402

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1200,900",
)
WAIT = 15  # seconds for any one thing the page does


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(tiny_checkpoint, tmp_path: Path) -> Iterator[str]:
    checkpoint, images = tiny_checkpoint
    loaded = load_checkpoint(checkpoint)
    embed_images(loaded, checkpoint, images, tmp_path / "emb", progress=False)
    app = create_app(Index.load(tmp_path / "emb", loaded))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not instance.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


ALL_IMAGES_LOADED = """
const images = Array.from(document.querySelectorAll('.result img'));
return images.length > 0 && images.every((image) => image.complete && image.naturalWidth > 0);
"""


def results(driver) -> list[tuple[float, str]]:
    cards = driver.find_elements(By.CSS_SELECTOR, ".result")
    return [
        (
            float(card.find_element(By.CLASS_NAME, "score").text),
            card.find_element(By.TAG_NAME, "img").get_attribute("alt"),
        )
        for card in cards
    ]


def test_search_click_for_similar_and_explain_in_a_real_browser(server: str, browser) -> None:
    wait = WebDriverWait(browser, WAIT)
    browser.get(server)
    query = browser.find_element(By.ID, "query")
    error = browser.find_element(By.ID, "error")

    # an empty query: a message, no request, the page stays usable
    query.send_keys(Keys.ENTER)
    wait.until(lambda driver: "type something" in error.text)

    query.send_keys("a large red circle", Keys.ENTER)
    wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ".result")) == 12)
    wait.until(lambda driver: driver.execute_script(ALL_IMAGES_LOADED))
    found = results(browser)
    scores = [score for score, _ in found]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    assert error.text == ""

    clicked = found[2][1]
    browser.find_elements(By.CSS_SELECTOR, ".result")[2].click()
    wait.until(lambda driver: driver.find_element(By.ID, "status").text == f"images similar to {clicked}")
    wait.until(lambda driver: driver.execute_script(ALL_IMAGES_LOADED))
    similar = results(browser)
    assert similar[0][1] == clicked and similar[0][0] == pytest.approx(1.0, abs=2e-3)

    # the explain toggle swaps every image for its heat-map overlay of the last text query
    browser.find_element(By.ID, "explain").click()
    wait.until(
        lambda driver: all(
            "/api/explain" in image.get_attribute("src")
            for image in driver.find_elements(By.CSS_SELECTOR, ".result img")
        )
    )
    wait.until(lambda driver: driver.execute_script(ALL_IMAGES_LOADED))
    assert error.text == ""
