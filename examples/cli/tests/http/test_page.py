"""The chat page at `/` in headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by Selenium): load it, send a message, read the
streamed answer and where it was computed, take a screenshot.

Skipped when Chromium is not installed, unless MESH_REQUIRE_BROWSER=1
(scripts/http-tests.sh --browser installs it and sets that).
"""
import os
import shutil

import pytest

from test_clients import PROMPT, mesh_generate, server  # noqa: F401 (fixture)

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE = os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)
if not HAVE and os.environ.get("MESH_REQUIRE_BROWSER") != "1":
    pytest.skip("chromium / chromium-driver not installed", allow_module_level=True)


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1000,700"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield d
    d.quit()


def test_chat_page_streams_an_answer_and_says_where(server, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    want = mesh_generate(max_tokens=256)["text"]
    browser.get(server + "/")
    assert browser.title == "mesh-llm chat"
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "model").text.startswith("model: "))
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    browser.find_element(By.ID, "send").click()
    seen_partial = []

    def finished(d):
        msgs = d.find_elements(By.CSS_SELECTOR, ".assistant")
        if not msgs:
            return False
        state = msgs[-1].get_attribute("data-state")
        if state == "streaming" and msgs[-1].text:
            seen_partial.append(msgs[-1].text)
        return state in ("done", "error") and msgs[-1]

    answer = WebDriverWait(browser, 300, poll_frequency=0.02).until(finished)
    assert answer.get_attribute("data-state") == "done", answer.text
    where = answer.find_element(By.CSS_SELECTOR, ".where").text
    text = answer.text[: -len(where)].rstrip("\n") if where else answer.text
    assert text.strip() == want.strip()
    assert "computed: local" in where and "tokens/s" in where, where
    shot = os.environ.get("MESH_SCREENSHOT", "/tmp/mesh-chat-page.png")
    assert browser.save_screenshot(shot)
    print("screenshot:", shot, "partial texts seen while streaming:", len(seen_partial))
