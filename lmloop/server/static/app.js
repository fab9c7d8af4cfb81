// lmloop chat page: plain JavaScript, no build step. Talks to the same server's OpenAI API
// (/v1/chat/completions, streamed) and feedback API (/v1/feedback). The conversation lives in
// sessionStorage (this tab only); so does the API key, which is sent as a Bearer token.
// Every answer is requested with its tokens' logprobs (top 5), kept beside the text as segments,
// so the "shade by probability" toggle can show, at any time, where the model was unsure.
// The versions panel polls /v1/lmloop/versions: the registry's versions of the served model,
// the gate's figures for each, and which one serves (it changes when the registry's does).
"use strict";

const $ = (sel) => document.querySelector(sel);
const STORE_MSGS = "lmloop.chat.messages";
const STORE_KEY = "lmloop.chat.apiKey";
const STORE_SHADE = "lmloop.chat.shade";
const TOP_LOGPROBS = 5;

// [{role, content, id?, model?, version?, thumb?, corrected?, error?, segments?}]; an answer's
// segments are [{text, logprob, tokens: [{token, logprob, top: [[token, logprob], ...]}]}], their
// texts concatenating to `content` (see `splitTokens`).
let messages = load();
let controller = null; // AbortController of the generation in progress
let modelId = null;

function load() {
  try { return JSON.parse(sessionStorage.getItem(STORE_MSGS)) || []; } catch { return []; }
}
function save() {
  // The logprobs are the bulk of what is stored: past the tab's quota, drop the oldest ones
  // (their answers then show as plain text) rather than lose the conversation.
  for (;;) {
    try { sessionStorage.setItem(STORE_MSGS, JSON.stringify(messages)); return; } catch (err) {
      const m = messages.find((x) => x.segments);
      if (!m) throw err;
      delete m.segments;
    }
  }
}

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) h.authorization = "Bearer " + key;
  return h;
}

function showError(text) {
  const box = $("#error");
  box.textContent = text || "";
  box.hidden = !text;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return `${resp.status}: ${body.error.message}`;
  } catch { /* not JSON */ }
  return `${resp.status} ${resp.statusText}`;
}

let withLogprobs = true;

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (resp.status === 401) { $("#model").textContent = "API key needed"; return; }
    if (!resp.ok) { $("#model").textContent = "model loading…"; setTimeout(loadModel, 2000); return; }
    const card = (await resp.json()).data[0];
    modelId = card.id;
    withLogprobs = card.logprobs !== false; // an upstream that ignores them: ask for none
    $("#model").textContent = `${card.id} · ${card.model_version}`;
  } catch {
    $("#model").textContent = "server unreachable";
  }
}

// ---- versions panel -------------------------------------------------------------------------
const VERSIONS_POLL_MS = 3000;
let versionsShown = null; // the body the panel shows: redrawn only when it changes
let versionsTimer = null;

async function loadVersions() {
  clearTimeout(versionsTimer);
  try {
    const resp = await fetch("/v1/lmloop/versions", { headers: headers() });
    if (resp.status === 401) { $("#versions-summary").textContent = "API key needed"; return; } // the key's `change` retries
    if (resp.ok) {
      const text = await resp.text();
      if (text !== versionsShown) {
        versionsShown = text;
        renderVersions(JSON.parse(text));
      }
    }
  } catch { /* unreachable for now: the next poll tries again */ }
  versionsTimer = setTimeout(loadVersions, VERSIONS_POLL_MS);
}

function renderVersions(body) {
  const rows = body.data || [];
  const tbody = $("#versions-table tbody");
  tbody.replaceChildren(...rows.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.version = r.version;
    if (r.serving) tr.className = "serving";
    const cells = [
      ["mark", r.serving ? "serving" : ""], ["version", r.version], ["win", r.text.win],
      ["degenerate", r.text.degenerate], ["base", r.text.base], ["decision", r.text.decision],
    ];
    for (const [cls, value] of cells) {
      const td = tr.insertCell();
      td.className = cls;
      td.textContent = value;
    }
    if (r.reason) tr.title = r.reason;
    return tr;
  }));
  $("#versions-table").hidden = rows.length === 0;
  $("#versions-reason").hidden = !body.reason;
  $("#versions-reason").textContent = body.reason || "";
  const rollback = $("#versions-rollback");
  rollback.hidden = !body.rollback;
  if (body.rollback) {
    const code = document.createElement("code");
    code.textContent = body.rollback;
    rollback.replaceChildren("To roll back, run ", code,
      " where the registry lives: this page's server follows the registry's current version within seconds.");
  }
  $("#versions-summary").textContent = body.name
    ? `${body.name} · serving ${body.serving || "…"} · ${rows.length} version${rows.length === 1 ? "" : "s"}`
    : "not served from the registry";
  // the header names the version taking new requests: a promotion or rollback changed it
  if (modelId && body.serving) $("#model").textContent = `${modelId} · ${body.serving}`;
}

// ---- rendering ------------------------------------------------------------------------------
function button(label, title, onClick, cls) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  if (cls) b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

function render() {
  const log = $("#log");
  $("#tip").hidden = true;
  log.querySelectorAll(".msg").forEach((n) => n.remove());
  $("#empty").hidden = messages.length > 0;
  messages.forEach((m, i) => log.appendChild(renderMessage(m, i)));
  log.scrollTop = log.scrollHeight;
}

function renderMessage(m, i) {
  const wrap = document.createElement("div");
  wrap.className = `msg ${m.role}` + (m.streaming ? " streaming" : "");
  wrap.dataset.index = i;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  fillBubble(bubble, m);
  wrap.appendChild(bubble);
  const meta = document.createElement("div");
  meta.className = "meta";
  const busy = controller !== null;
  if (m.role === "user") {
    const edit = button("Edit", "edit this message and answer again", () => startEdit(i), "edit-btn");
    edit.disabled = busy;
    meta.appendChild(edit);
  } else if (m.role === "assistant") {
    if (m.version) {
      const v = document.createElement("span");
      v.className = "version";
      v.textContent = `${m.model} · ${m.version}`;
      v.title = "the model version that wrote this answer";
      meta.appendChild(v);
    }
    if (m.error) {
      const e = document.createElement("span");
      e.className = "note";
      e.style.color = "var(--bad)";
      e.textContent = m.error;
      meta.appendChild(e);
    }
    if (m.id && !m.streaming) {
      // text marks, not emoji: a machine without an emoji font shows empty boxes
      const up = button("✓ Good", "thumbs up: a good answer", () => rate(i, "up"), "thumb-up up");
      const down = button("✗ Bad", "thumbs down: a bad answer", () => rate(i, "down"), "thumb-down down");
      if (m.thumb === "up") up.classList.add("active");
      if (m.thumb === "down") down.classList.add("active");
      meta.append(up, down, button("Correct", "write a better answer", () => startCorrection(i, wrap), "correct-btn"));
      if (i === messages.length - 1) {
        const regen = button("Regenerate", "answer again", regenerate, "regen-btn");
        regen.disabled = busy;
        meta.appendChild(regen);
      }
      if (m.corrected) {
        const note = document.createElement("span");
        note.className = "note";
        note.textContent = "correction saved";
        meta.appendChild(note);
      }
    }
  }
  wrap.appendChild(meta);
  return wrap;
}

// ---- token probabilities ------------------------------------------------------------------
const shading = () => $("#shade").checked;

// The answer's text, plain or as one span per token shaded by the model's probability of it
// (`--p`, see style.css). Plain whenever the segments do not spell the text exactly.
function fillBubble(bubble, m) {
  const segs = m.segments;
  if (!shading() || !segs || segs.map((s) => s.text).join("") !== m.content) {
    bubble.textContent = m.content;
    return;
  }
  bubble.replaceChildren(...segs.map((s, k) => {
    if (!s.tokens.length) return document.createTextNode(s.text); // text with no logprobs
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = s.text;
    span.dataset.seg = k;
    span.dataset.logprob = s.logprob;
    span.dataset.tokens = s.tokens.length;
    span.style.setProperty("--p", Math.exp(s.logprob).toFixed(4));
    return span;
  }));
}

// Streamed chunks pair text with the tokens that produced it, but not always one to one: the
// server holds back a character split over several tokens, and text that may start a stop
// string, and sends it with a later token. So tokens wait in `pending` until text comes, and
// that text is split among them: each token takes its own decoded string where the text shows
// it (after whitespace a decoder may drop from a lone token); from the first token it does not
// show, the rest of the text goes, as one segment, to the rest of the tokens (the pieces of one
// character, each alone decoding to U+FFFD: the character's probability is theirs multiplied).
// Tokens that never bring text (the end-of-text token, a stop string) show nowhere.
function splitTokens(text, pending) {
  const out = [];
  const seg = (t, toks) => ({ text: t, logprob: toks.reduce((a, x) => a + x.logprob, 0), tokens: toks });
  let at = 0;
  let i = 0;
  for (; i < pending.length; i++) {
    const t = pending[i].token;
    if (!t) break;
    const j = text.indexOf(t, at);
    if (j < 0 || text.slice(at, j).trim() !== "") break;
    out.push(seg(text.slice(at, j + t.length), [pending[i]]));
    at = j + t.length;
  }
  if (at < text.length) {
    if (i < pending.length) out.push(seg(text.slice(at), pending.slice(i)));
    else if (out.length) out[out.length - 1].text += text.slice(at);
    else out.push(seg(text.slice(at), []));
  }
  return out;
}

const compact = (c) => ({
  token: c.token,
  logprob: c.logprob,
  top: (c.top_logprobs || []).map((t) => [t.token, t.logprob]),
});

const visible = (t) => t.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");

function percent(logprob) {
  const p = 100 * Math.exp(logprob);
  return p < 0.1 ? "<0.1%" : `${p.toFixed(1)}%`;
}

// The hover card: each token of the span, its probability, and the top alternatives.
function showTip(span) {
  const m = messages[span.closest(".msg").dataset.index];
  const s = m && m.segments && m.segments[span.dataset.seg];
  if (!s) return;
  const tip = $("#tip");
  tip.replaceChildren();
  for (const tok of s.tokens) {
    const head = document.createElement("div");
    head.className = "tip-head";
    head.textContent = `${visible(tok.token)}  ${percent(tok.logprob)}`;
    const table = document.createElement("table");
    for (const [t, lp] of tok.top) {
      const row = table.insertRow();
      if (t === tok.token) row.className = "chosen";
      row.insertCell().textContent = visible(t);
      row.insertCell().textContent = percent(lp);
    }
    tip.append(head, table);
  }
  tip.hidden = false;
  const r = span.getBoundingClientRect();
  const w = tip.offsetWidth;
  const h = tip.offsetHeight;
  tip.style.left = `${Math.max(4, Math.min(r.left, window.innerWidth - w - 4))}px`;
  tip.style.top = `${r.bottom + h + 8 < window.innerHeight ? r.bottom + 6 : Math.max(4, r.top - h - 6)}px`;
}

// ---- generation -----------------------------------------------------------------------------
async function generate() {
  showError("");
  const history = messages.map((m) => ({ role: m.role, content: m.content }));
  const answer = { role: "assistant", content: "", streaming: true };
  messages.push(answer);
  controller = new AbortController();
  setBusy(true);
  render();
  const bubble = () => $("#log").lastElementChild.querySelector(".bubble");
  answer.segments = [];
  let pending = []; // tokens whose text has not come yet (see splitTokens)
  const body = {
    messages: history,
    stream: true,
    stream_options: { include_usage: true },
    ...(withLogprobs ? { logprobs: true, top_logprobs: TOP_LOGPROBS } : {}),
    temperature: Number($("#temperature").value),
    max_tokens: Number($("#max-tokens").value),
  };
  if (modelId) body.model = modelId;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          answer.id = chunk.id;
          answer.model = chunk.model;
          answer.version = chunk.model_version;
          for (const c of chunk.choices || []) {
            if (c.logprobs && c.logprobs.content) pending.push(...c.logprobs.content.map(compact));
            if (c.delta && c.delta.content) {
              answer.content += c.delta.content;
              answer.segments.push(...splitTokens(c.delta.content, pending));
              pending = [];
              fillBubble(bubble(), answer);
              $("#log").scrollTop = $("#log").scrollHeight;
            }
          }
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") answer.error = "stopped";
    else { answer.error = "failed"; showError(String(err.message || err)); }
    if (!answer.content && !answer.id) messages.pop();
  } finally {
    delete answer.streaming;
    controller = null;
    setBusy(false);
    save();
    render();
  }
}

function setBusy(busy) {
  $("#send").disabled = busy;
  $("#stop").hidden = !busy;
}

function send(text) {
  if (!text.trim() || controller) return;
  messages.push({ role: "user", content: text });
  $("#prompt").value = "";
  generate();
}

function regenerate() {
  if (controller) return;
  if (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
  generate();
}

function startEdit(i) {
  if (controller) return;
  const node = $(`#log .msg[data-index="${i}"]`);
  const form = document.createElement("div");
  form.className = "edit";
  const area = document.createElement("textarea");
  area.value = messages[i].content;
  const row = document.createElement("div");
  row.className = "row";
  row.append(
    button("Cancel", "keep the message", render),
    button("Save & answer", "replace the message and answer again", () => {
      if (!area.value.trim()) return;
      messages = messages.slice(0, i);
      messages.push({ role: "user", content: area.value });
      generate();
    }, "save-edit"),
  );
  form.append(area, row);
  node.replaceChildren(form);
  area.focus();
}

// ---- feedback -------------------------------------------------------------------------------
async function postFeedback(body) {
  const resp = await fetch("/v1/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.json();
}

async function rate(i, thumb) {
  const m = messages[i];
  try {
    await postFeedback({ response_id: m.id, thumb });
    m.thumb = thumb;
    save();
    render();
  } catch (err) {
    showError("feedback not saved: " + err.message);
  }
}

function startCorrection(i, node) {
  if (node.querySelector(".correction")) return;
  const form = document.createElement("div");
  form.className = "correction";
  const area = document.createElement("textarea");
  area.placeholder = "Write the answer the model should have given";
  area.value = messages[i].content;
  const row = document.createElement("div");
  row.className = "row";
  row.append(
    button("Cancel", "discard", () => form.remove()),
    button("Send correction", "record this as the better answer", async () => {
      if (!area.value.trim()) return;
      try {
        await postFeedback({ response_id: messages[i].id, correction: area.value });
        messages[i].corrected = true;
        save();
        render();
      } catch (err) {
        showError("correction not saved: " + err.message);
      }
    }, "send-correction"),
  );
  form.append(area, row);
  node.appendChild(form);
  area.focus();
}

// ---- wiring ---------------------------------------------------------------------------------
$("#api-key").value = sessionStorage.getItem(STORE_KEY) || "";
$("#api-key").addEventListener("change", () => {
  sessionStorage.setItem(STORE_KEY, $("#api-key").value.trim());
  loadModel();
  loadVersions();
});
$("#composer").addEventListener("submit", (e) => { e.preventDefault(); send($("#prompt").value); });
$("#prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send($("#prompt").value); }
});
$("#stop").addEventListener("click", () => controller && controller.abort());
$("#shade").checked = sessionStorage.getItem(STORE_SHADE) === "1";
$("#shade").addEventListener("change", () => {
  sessionStorage.setItem(STORE_SHADE, shading() ? "1" : "0");
  $("#tip").hidden = true;
  // the bubbles only: an edit or a correction being written stays open
  document.querySelectorAll("#log .msg.assistant").forEach((n) => {
    const m = messages[n.dataset.index];
    const bubble = n.querySelector(".bubble");
    if (m && bubble) fillBubble(bubble, m);
  });
});
$("#log").addEventListener("mouseover", (e) => {
  const span = e.target.closest && e.target.closest(".tok");
  if (span) showTip(span);
});
$("#log").addEventListener("mouseout", (e) => {
  if (e.target.closest && e.target.closest(".tok")) $("#tip").hidden = true;
});
$("#new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  messages = [];
  save();
  showError("");
  render();
});
render();
loadModel();
loadVersions();
