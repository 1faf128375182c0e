"""The web page at `/`, in a real headless browser (Debian's chromium driven by Playwright), with the keyboard only:
an API key, an image picked through the file chooser, the notebook's chart question, the answer streamed in and
equal to `phi3v-ort run`'s, the stats under it, a follow-up, "New conversation", and no request to anywhere but
the server.

Marked `browser`; skipped, with the reason, when /usr/bin/chromium or playwright is missing (.ci/run installs
both). PHI3V_ORT_SCREENSHOT=PATH saves the screenshot there (docs/web-page.png was made so).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi3v_ort.cli import cli

from tests.conftest import Served

CHROMIUM = "/usr/bin/chromium"
CHART = Path(__file__).parents[1] / "data" / "chart.png"
QUESTION = "Could you please introduce this stock to me?"
KEY = "s3cret"
MAX_TOKENS = 24


def _missing() -> str | None:
    if importlib.util.find_spec("starlette") is None:
        return "the server needs the serve extra"
    if not os.path.exists(CHROMIUM):
        if shutil.which("apt-get") is None:
            return f"{CHROMIUM} is missing and apt-get is not available here to install it (Debian's chromium)"
        return f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed: pip install playwright (.ci/run does)"
    return None


pytestmark = [pytest.mark.browser, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


@pytest.fixture(scope="module")
def keyed_server(tiny_dir, tmp_path_factory):
    server = Served(tiny_dir, tmp_path_factory.mktemp("web"), "--workers", "1", "--api-key", KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"])
        yield browser
        browser.close()


def _active(page) -> str:
    return page.evaluate("document.activeElement ? document.activeElement.id || document.activeElement.tagName : ''")


def _wait_for_answers(page, n: int) -> None:
    # (functions, not expression strings: the page's Content-Security-Policy forbids eval, as it should)
    page.wait_for_function("(n) => { const s = document.querySelectorAll('.turn .stats');"
                           " return s.length >= n && s[n - 1].textContent.length > 0; }", arg=n, timeout=60_000)


def test_the_page_answers_the_chart_question_with_the_keyboard_alone(keyed_server, browser, tiny_dir, tmp_path):
    expected = json.loads(CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), "--json", "--max-new-tokens",
                                                   str(MAX_TOKENS), "-i", str(CHART), QUESTION]).stdout)
    page = browser.new_page(viewport={"width": 1000, "height": 560})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(keyed_server.url + "/")
    assert page.title() == "phi3v-ort · tiny-int4-cpu"
    assert _active(page) == "question"  # ready to type

    # the tab order: API key, images, question, Ask, max tokens, New conversation (Stop is disabled until needed)
    order = []
    for key in ["Shift+Tab"] * 2 + ["Tab"] * 5:
        page.keyboard.press(key)
        order.append(_active(page))
    assert order == ["file", "apikey", "file", "question", "send", "maxtokens", "new"], order
    for _ in range(3):
        page.keyboard.press("Shift+Tab")

    # without the API key the server says 401, and the question stays in the form
    assert _active(page) == "question"
    page.keyboard.type("Hello?")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('401')", timeout=30_000)
    assert "invalid or missing API key" in page.inner_text("#status")
    assert page.input_value("#question") == "Hello?" and page.locator(".turn").count() == 0

    # the key, then the image through the file chooser (opened with Space), the max tokens, the question
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    assert _active(page) == "apikey"
    page.keyboard.type(KEY)
    page.keyboard.press("Tab")
    assert _active(page) == "file"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(str(CHART))
    page.wait_for_selector("#attached img")
    for _ in range(4):  # the image's remove button, the question, Ask, max tokens
        page.keyboard.press("Tab")
    assert _active(page) == "maxtokens"
    page.keyboard.press("Control+A")
    page.keyboard.type(str(MAX_TOKENS))
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    assert _active(page) == "question"
    page.keyboard.type(QUESTION)
    page.keyboard.press("Enter")
    _wait_for_answers(page, 1)

    turn = page.locator(".turn").nth(0)
    assert turn.locator(".question").inner_text() == QUESTION
    assert turn.locator("img").count() == 1
    assert turn.locator(".answer").inner_text() == expected["text"].strip()
    stats = turn.locator(".stats").inner_text()
    assert f"prompt tokens {expected['prompt_tokens']:,} (image tokens: 1,921)" in stats, stats
    assert "first token " in stats and " tokens/s" in stats
    assert f"{MAX_TOKENS} tokens generated, finish: {expected['finish_reason']}" in stats, stats
    shot = Path(os.environ.get("PHI3V_ORT_SCREENSHOT") or tmp_path / "web-page.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # a follow-up continues the conversation (the whole transcript is sent; the image stays in it)
    assert _active(page) == "question"
    page.keyboard.type("And the trend?")
    page.keyboard.press("Enter")
    _wait_for_answers(page, 2)
    second = page.locator(".turn").nth(1).locator(".stats").inner_text()
    assert "(image tokens: 1,921)" in second and int(second.split()[2].replace(",", "")) > expected["prompt_tokens"]

    # New conversation, from the keyboard
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert _active(page) == "new"
    page.keyboard.press("Enter")
    assert page.locator(".turn").count() == 0 and _active(page) == "question"

    origin = keyed_server.url
    elsewhere = [u for u in requests if not (u.startswith(origin + "/") or u.startswith(("data:", "blob:")))]
    assert not elsewhere, elsewhere
    page.close()
