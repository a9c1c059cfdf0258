"""The web chat page in headless Chromium: type a question, watch the answer stream, stop one, keep history.

Uses Debian's `chromium` (browser downloads by test tools do not work offline); `make test` installs
it when run as root. Set EDGEFT_SCREENSHOT_DIR to keep the screenshot the test takes.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from edgeft.runtime import ChatModel
from edgeft.runtime.server import create_app
from tests.helpers import LiveServer, SlowModel, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium "
        "(apt-get install chromium; `make test` does it when run as root)",
    ),
]


@pytest.fixture(scope="module")
def phi3_model(tiny_phi3_export) -> ChatModel:
    return ChatModel.load(tiny_phi3_export)  # its greedy answers are visible text (the llama's are newlines)


@pytest.fixture
def site(phi3_model):
    slow = SlowModel(phi3_model, delay=0.01)  # slow enough to see the answer grow and to press Stop
    live = LiveServer(create_app(slow))
    yield live, slow
    live.stop()


@pytest.fixture
def page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (edgeft[dev])")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1000, "height": 720},
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()


def wait_until(page, expression: str, timeout: float = 10_000) -> None:
    """Poll a page expression until it is true. (Playwright's wait_for_function evaluates its
    predicate with eval(), which the page's Content-Security-Policy forbids, as it should.)"""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def test_chat_page_streams_an_answer_and_keeps_history(site, page, phi3_model, tmp_path):
    live, slow = site
    page.goto(live.url + "/")
    wait_until(page, "document.getElementById('model').textContent.includes('phi3-onnx-fp32')")
    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "60")

    page.fill("#input", "What is the capital of France?")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.user")
    # Streaming: while the answer is pending it already shows part of the text.
    wait_until(
        page,
        "(() => { const a = document.querySelector('.msg.assistant.pending');"
        " return a && a.textContent.length > 3; })()",
    )
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    page.wait_for_selector(".msg.assistant .meta", timeout=30_000)

    expected = phi3_model.chat(
        [{"role": "user", "content": "What is the capital of France?"}], max_tokens=60, temperature=0
    )
    shown = page.evaluate("document.querySelector('.msg.assistant').firstChild.textContent")
    assert shown == expected.text
    stats = page.inner_text("#stats")
    assert "tokens/s" in stats and f"{expected.usage['completion_tokens']} tokens" in stats

    page.fill("#input", "And of Italy?")
    page.click("#send")
    wait_until(page, "document.querySelectorAll('.msg.assistant .meta').length == 2", timeout=30_000)
    assert [m["role"] for m in slow.calls[-1]] == ["user", "assistant", "user"]  # the history went along
    assert slow.calls[-1][1]["content"] == expected.text

    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot))
    if os.environ.get("EDGEFT_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["EDGEFT_SCREENSHOT_DIR"]) / "chat.png")


def test_stop_button_ends_the_answer(site, page):
    live, slow = site
    page.goto(live.url + "/")
    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "3000")
    page.fill("#input", "Tell me a long story.")
    page.keyboard.press("Enter")
    wait_until(
        page,
        "(() => { const a = document.querySelector('.msg.assistant.pending');"
        " return a && a.textContent.length > 10; })()",
    )
    page.click("#stop")
    page.wait_for_selector(".msg.assistant .meta")
    assert "stopped" in page.inner_text(".msg.assistant .meta")
    assert page.is_enabled("#send")
    # the server saw the connection close and stopped generating
    wait_for(lambda: slow.streams[-1].result is not None)
    assert slow.streams[-1].result.finish_reason == "cancelled"


def test_errors_are_shown_on_the_page(site, page):
    live, _ = site
    page.goto(live.url + "/")
    page.click("#settings summary")
    page.fill("#max_tokens", "999999")
    page.fill("#input", "hi")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.error")
    assert "does not fit" in page.inner_text(".msg.error")
    assert page.is_enabled("#send")
