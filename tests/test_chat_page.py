"""The chat page in real headless Chromium (Playwright, Debian's `chromium`) against `lmloop serve`.

Enter the API key, send a message, watch the answer stream in with the model version shown,
regenerate it, rate it thumbs-up, send a correction, edit the question; then find the rating and
the correction in the feedback store under the answer's response id.
"""

from __future__ import annotations

import shutil

import pytest
from playwright.sync_api import expect, sync_playwright
from test_server_kit import Server, make_tiny_model

from lmloop.feedback.store import FeedbackStore

KEY = "sk-page-test"
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page")
    srv = Server(make_tiny_model(tmp / "model", seed=1), tmp, "--model-name", "tiny", api_key=KEY)
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0


def _messages(page) -> list[dict]:
    return page.evaluate("JSON.parse(sessionStorage.getItem('lmloop.chat.messages'))")


def test_chat_page_end_to_end(server, tmp_path):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(server.url + "/")
        expect(page.locator("#model")).to_have_text("API key needed")
        page.fill("#api-key", KEY)
        page.locator("#api-key").press("Tab")  # `change` stores the key and reloads the model
        expect(page.locator("#model")).to_contain_text("tiny · ")
        version = page.locator("#model").inner_text().split(" · ")[1]
        page.fill("#temperature", "1")
        page.fill("#max-tokens", "24")

        page.fill("#prompt", "Hello there, who are you?")
        page.click("#send")
        answer = page.locator(".msg.assistant").last
        expect(answer.locator(".thumb-up")).to_be_visible(timeout=30_000)  # shown once done
        expect(answer.locator(".version")).to_have_text(f"tiny · {version}")
        first_id = _messages(page)[-1]["id"]
        assert first_id.startswith("chatcmpl-")

        # regenerate until the (random-weight) model says something: a new answer each time
        for _ in range(5):
            page.locator(".regen-btn").click()
            expect(page.locator(".msg.assistant .thumb-up")).to_be_visible(timeout=30_000)
            if _messages(page)[-1]["content"]:
                break
        msgs = _messages(page)
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        rid, text = msgs[-1]["id"], msgs[-1]["content"]
        assert rid != first_id and text
        expect(page.locator(".msg.assistant .bubble")).to_have_text(text)

        page.locator(".msg.assistant .thumb-up").click()
        expect(page.locator(".msg.assistant .thumb-up.active")).to_be_visible()
        page.locator(".msg.assistant .correct-btn").click()
        page.fill(".correction textarea", "I am a tiny test model.")
        page.locator(".send-correction").click()
        expect(page.locator(".msg.assistant .note")).to_have_text("correction saved")
        shot = tmp_path / "chat.png"
        page.screenshot(path=str(shot))
        shutil.copy(shot, "/tmp/lmloop_chat_page.png")

        # edit the question: the conversation is cut there and answered again
        page.locator(".msg.user .edit-btn").click()
        page.fill(".edit textarea", "Tell me about foxes.")
        page.locator(".save-edit").click()
        expect(page.locator(".msg.assistant .thumb-up")).to_be_visible(timeout=30_000)
        msgs = _messages(page)
        assert [m["content"] for m in msgs if m["role"] == "user"] == ["Tell me about foxes."]
        assert msgs[-1]["id"] not in (rid, first_id)

        # history survives a reload (sessionStorage)
        page.reload()
        expect(page.locator(".msg.user .bubble")).to_have_text("Tell me about foxes.")
        browser.close()

    store = FeedbackStore(server.db)
    try:
        fb = store.feedback_for(rid)
        assert any(f["thumb"] == "up" for f in fb)
        assert any(f["correction"] == "I am a tiny test model." for f in fb)
        rec = store.get_response(rid)
        assert rec["text"] == text and rec["model_version"] == version
        assert rec["messages"][-1]["content"] == "Hello there, who are you?"
    finally:
        store.close()
