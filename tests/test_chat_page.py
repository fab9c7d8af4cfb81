"""The chat page in real headless Chromium (Playwright, Debian's `chromium`) against `lmloop serve`.

Enter the API key, send a message, watch the answer stream in with the model version shown,
regenerate it, rate it thumbs-up, send a correction, edit the question; then find the rating and
the correction in the feedback store under the answer's response id. Then the "shade by
probability" toggle: a greedy answer as one span per token (a character split over several tokens
is one span), checked against the API's logprobs for the same request: the text, each span's
probability and shade, the alternatives on hover; off again, plain text. Last, the versions panel:
the model is served from the registry (`registry:tiny`), whose v1 carries the gate's figures; the
panel lists them and marks the serving version, and follows a promotion to v2.

The tiny model is taught four question-answer pairs first (a few seconds), so that its answers are
text with probabilities that vary, not a random model's flat ones.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright
from test_server_kit import Server, decision_lineage, make_tiny_model

from lmloop.feedback.store import FeedbackStore
from lmloop.registry import Registry

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


QA = [
    ("Tell me about foxes.", "The quick brown fox jumps over the lazy dog."),
    (
        "What is a language model?",
        "A language model predicts the next token from the ones before it.",
    ),
    ("Hello there, who are you?", "Hello! How are you today? I am fine, thank you."),
    ("Any odd words?", "Numbers like 12345 and words like café, naïve, and 東京 appear too."),
]
# Close to a taught question, not one of them: a known answer, some tokens sure, some not,
# and characters (é, ï) that the byte-level tokenizer splits over two tokens.
ASK = "Any odd words?!"


def _teach(model_dir) -> None:
    """A few full-batch AdamW steps on QA, saved over the random weights."""
    import torch
    import torch.nn.functional as F

    from lmloop.models.io import load_model, save_model

    lm = load_model(model_dir)
    model, tok = lm.model.train(), lm.tokenizer
    rows = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                add_generation_prompt=False,
            )
        )
        for q, a in QA
    ]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    targets = torch.tensor([r[1:] + [-100] * (width - len(r)) for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, loss.item()
    save_model(model_dir, model.eval(), tok)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("page")


@pytest.fixture(scope="module")
def registry(home):
    return Registry(home / "home" / "registry")  # the server's $LMLOOP_HOME is home/home


@pytest.fixture(scope="module")
def server(home, registry):
    model = make_tiny_model(home / "model", seed=1)
    _teach(model)
    lineage = decision_lineage(15, 0, 5, (0.55, 0.9), (0.25, 0.1), (20.0, 20.5))
    registry.promote("tiny", registry.register("tiny", model, lineage=lineage))
    # fp32, as before `--precision auto` became the default: the page's logprobs are compared
    # with another request's, which int4 weights break while a sequence's steps switch between
    # 4-bit (alone) and int8 (batched) weights (`auto`: test_precision.py)
    srv = Server("registry:tiny", home, "--model-name", "tiny", "--registry-poll", "0.3",
                 "--precision", "fp32", api_key=KEY)  # fmt: skip
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0


def _messages(page) -> list[dict]:
    return page.evaluate("JSON.parse(sessionStorage.getItem('lmloop.chat.messages'))")


def _open(p, server):
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(server.url + "/")
    page.fill("#api-key", KEY)
    page.locator("#api-key").press("Tab")
    expect(page.locator("#model")).to_contain_text("tiny · ")
    return browser, page


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

        # regenerate until the (tiny, sampling) model says something: a new answer each time
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


# ---- shade by probability --------------------------------------------------------------------
def _visible(token: str) -> str:  # as the page shows a token: spaces, newlines, tabs made visible
    return token.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u2192")


def _percent(logprob: float) -> str:
    p = 100 * math.exp(logprob)
    return "<0.1%" if p < 0.1 else f"{p:.1f}%"


def _reference(server, messages: list[dict]) -> tuple[str, list[dict], str]:
    """The page's request made directly, streamed: (text, logprobs.content entries, finish)."""
    body = {"model": "tiny", "messages": messages, "max_tokens": 24, "temperature": 0,
            "logprobs": True, "top_logprobs": 5}  # fmt: skip
    text, entries, finish = "", [], None
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                      headers=server.headers(), timeout=60) as r:  # fmt: skip
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                text += c["delta"].get("content") or ""
                entries += (c["logprobs"] or {}).get("content") or []
                finish = c["finish_reason"] or finish
    # streaming carries the same logprobs as the whole answer, in OpenAI's shape
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.headers(),
                       timeout=60).json()["choices"][0]  # fmt: skip
    assert whole["message"]["content"] == text and whole["finish_reason"] == finish
    assert [e["token"] for e in whole["logprobs"]["content"]] == [e["token"] for e in entries]
    for a, b in zip(whole["logprobs"]["content"], entries):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)
        assert set(b) >= {"token", "logprob", "bytes", "top_logprobs"}
        assert len(b["top_logprobs"]) == 5
    return text, entries, finish


SPANS_JS = """b => ({
    nodes: b.childNodes.length,
    spans: [...b.querySelectorAll('.tok')].map(n => ({
        text: n.textContent, n: +n.dataset.tokens, logprob: +n.dataset.logprob,
        color: getComputedStyle(n).backgroundColor,
    })),
})"""


def _alpha(color: str) -> float:
    m = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(?:, ([\d.e-]+))?\)", color)
    assert m, color
    return float(m.group(4) or 1)


def _check_shaded(bubble, answer: str, entries: list[dict], finish: str) -> list[list[dict]]:
    """Spans spell the answer, one per token (or per split character), shaded by 1 - p; returns
    the API entries behind each span."""
    got = bubble.evaluate(SPANS_JS)
    spans = got["spans"]
    assert got["nodes"] == len(spans) > 0  # nothing but token spans
    assert "".join(s["text"] for s in spans) == answer
    groups, k = [], 0
    for s in spans:
        group = entries[k : k + s["n"]]
        assert len(group) == s["n"] >= 1
        lp = sum(e["logprob"] for e in group)
        assert s["logprob"] == pytest.approx(lp, abs=1e-5)
        if s["n"] == 1:  # a whole token shows as the API names it (byte-level: no dropped spaces)
            assert s["text"] == group[0]["token"]
        else:  # pieces of one character: alone each decodes to U+FFFD
            assert any("\ufffd" in e["token"] for e in group), group
        # the shade: 0.75 * (1 - p), p from the API; so monotonic in p
        assert _alpha(s["color"]) == pytest.approx(0.75 * (1 - math.exp(lp)), abs=0.01)
        groups.append(group)
        k += s["n"]
    # tokens after the text bring none (the end-of-text token)
    assert k == len(entries) or (finish == "stop" and k == len(entries) - 1)
    by_p = sorted(zip((sum(e["logprob"] for e in g) for g in groups), spans), key=lambda t: t[0])
    alphas = [_alpha(s["color"]) for _, s in by_p]
    assert alphas == sorted(alphas, reverse=True)  # more probable, lighter
    return groups


SPLIT_CASES = [  # (text of a chunk, its pending tokens, the segments expected: (text, n tokens))
    ("é", ["\ufffd", "\ufffd"], [("é", 2)]),  # one character over two tokens
    (" café", [" caf", "\ufffd", "\ufffd"], [(" caf", 1), ("é", 2)]),
    ("aï", ["a\ufffd", "\ufffd"], [("aï", 2)]),
    ("User", ["Us", "er"], [("Us", 1), ("er", 1)]),  # held back as a possible stop, then sent
    (" Hello world", ["Hello", "world"], [(" Hello", 1), (" world", 1)]),  # Metaspace
    ("end", ["end", "<|im_end|>"], [("end", 1)]),  # the stop token shows nowhere
    ("x", [], [("x", 0)]),  # text without logprobs
    ("ab ", ["ab"], [("ab ", 1)]),  # text past the last token's own: still spelled
    ("abc", ["xyz"], [("abc", 1)]),  # a token the text does not show: all of it, still spelled
]


def test_chat_page_shades_tokens_by_probability(server):
    with sync_playwright() as p:
        browser, page = _open(p, server)
        # the splitting of streamed text among its tokens, on the cases streaming produces
        for text, toks, want in SPLIT_CASES:
            pending = [
                {"token": t, "logprob": -0.5 * (i + 1), "top": []} for i, t in enumerate(toks)
            ]
            segs = page.evaluate("([t, p]) => splitTokens(t, p)", [text, pending])
            assert [(s["text"], len(s["tokens"])) for s in segs] == want, (text, toks)
            assert "".join(s["text"] for s in segs) == text

        expect(page.locator("#shade")).not_to_be_checked()
        page.check("#shade")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "24")
        page.fill("#prompt", ASK)
        page.click("#send")
        answer = page.locator(".msg.assistant").last
        expect(answer.locator(".thumb-up")).to_be_visible(timeout=30_000)
        text, entries, finish = _reference(server, [{"role": "user", "content": ASK}])
        assert _messages(page)[-1]["content"] == text and len(text) > 20
        bubble = answer.locator(".bubble")
        groups = _check_shaded(bubble, text, entries, finish)
        probs = [math.exp(sum(e["logprob"] for e in g)) for g in groups]
        assert min(probs) < 0.7 and max(probs) > 0.95  # a model sure of some tokens, not others
        assert any(len(g) > 1 for g in groups), "no split character: pick another ASK"

        # hover: each token of the span, its probability, its top 5 alternatives with theirs
        spans = bubble.locator(".tok")
        least = min(range(len(groups)), key=lambda i: probs[i])
        split = next(i for i, g in enumerate(groups) if len(g) > 1)
        for i in (least, split):
            spans.nth(i).hover()
            tip = page.locator("#tip")
            expect(tip).to_be_visible()
            heads = tip.locator(".tip-head").all_inner_texts()
            assert heads == [f"{_visible(e['token'])}  {_percent(e['logprob'])}" for e in groups[i]]
            rows = tip.locator("tr").evaluate_all("rs => rs.map(r => r.innerText.split('\\t'))")
            want = [[_visible(t["token"]), _percent(t["logprob"])] for e in groups[i]
                    for t in e["top_logprobs"]]  # fmt: skip
            assert rows == want
            if i == least:
                page.screenshot(path="/tmp/lmloop_chat_page_shaded.png")
        page.mouse.move(2, 2)
        expect(page.locator("#tip")).to_be_hidden()

        # off: the plain text, one text node; on again: the spans, from what was stored
        page.uncheck("#shade")
        assert bubble.evaluate(SPANS_JS) == {"nodes": 1, "spans": []}
        assert bubble.evaluate("b => b.textContent") == text
        page.check("#shade")
        _check_shaded(bubble, text, entries, finish)

        # the other features on a shaded answer: thumbs, regenerate (greedy: the same text, a
        # new response id), and history (the toggle and the shading survive a reload)
        first_id = _messages(page)[-1]["id"]
        answer.locator(".thumb-up").click()
        expect(answer.locator(".thumb-up.active")).to_be_visible()
        page.locator(".regen-btn").click()
        expect(page.locator(".msg.assistant .thumb-up")).to_be_visible(timeout=30_000)
        assert _messages(page)[-1]["id"] != first_id
        _check_shaded(page.locator(".msg.assistant .bubble"), text, entries, finish)
        page.reload()
        expect(page.locator("#shade")).to_be_checked()
        _check_shaded(page.locator(".msg.assistant .bubble"), text, entries, finish)
        page.uncheck("#shade")
        expect(page.locator(".msg.assistant .bubble")).to_have_text(text)
        browser.close()


# ---- the versions panel ----------------------------------------------------------------------


def test_chat_page_versions_panel(server, registry):
    with sync_playwright() as p:
        browser, page = _open(p, server)
        panel = page.locator("#versions")
        expect(panel.locator("#versions-summary")).to_have_text("tiny · serving v1 · 1 version")
        panel.locator("summary").click()
        row = panel.locator('tr[data-version="v1"]')
        expect(row).to_have_class("serving")
        expect(row.locator(".mark")).to_have_text("serving")
        expect(row.locator(".win")).to_have_text("0.75 [0.55, 0.90]")
        expect(row.locator(".degenerate")).to_have_text("25% -> 10%")
        expect(row.locator(".base")).to_have_text("+2.5%")
        expect(row.locator(".decision")).to_have_text("promoted (current)")
        expect(panel.locator("#versions-rollback")).to_contain_text("lmloop models rollback tiny")

        # a promotion: the server reloads (registry poll) and the panel follows unasked
        lineage = decision_lineage(12, 2, 6, (0.45, 0.8), (0.1, 0.05), (20.5, 20.0))
        served = registry.current("tiny")[1]  # the same weights again, with other figures
        registry.promote("tiny", registry.register("tiny", served, parent="v1", lineage=lineage))
        new = panel.locator('tr[data-version="v2"]')
        expect(new).to_have_class("serving", timeout=30_000)
        expect(new.locator(".win")).to_have_text("0.65 [0.45, 0.80]")
        expect(row).not_to_have_class("serving")
        expect(row.locator(".decision")).to_have_text("promoted")
        expect(page.locator("#model")).to_have_text("tiny · v2")
        page.screenshot(path="/tmp/lmloop_chat_page_versions.png")
        browser.close()
