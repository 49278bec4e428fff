"""The DingTalk simulator's web chat page (``GET /``): one self-contained HTML document.

No external assets, so it works offline. The page injects messages with ``POST /_sim/messages``
and polls ``GET /_sim/messages`` and ``GET /_sim/replies`` (``?after=<seq>``) and, when the card
extension is installed, ``GET /_sim/cards`` (``?after=<version>``) twice a second. AI cards are
shown where they were created and re-rendered as their text grows, with their status
(processing, inputing, finished, failed); the final text the card extension mirrors into the
replies is not shown a second time. Replies are rendered as plain text (markdown as
preformatted text); nothing from the server is inserted as HTML.
"""

from __future__ import annotations

import json
from typing import Any, Final

__all__ = ["render_page"]

_CONFIG_MARK: Final = "/*__CONFIG__*/null"

_PAGE: Final = """<!doctype html>
<html lang="zh-CN">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imrelay · DingTalk simulator 钉钉模拟器</title>
<style>
  :root { --blue: #1677ff; --bg: #f3f5f8; --line: #e3e6eb; --text: #1f2329; --muted: #8f959e; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.5 -apple-system, "Segoe UI", "PingFang SC", "Microsoft YaHei",
         "Noto Sans CJK SC", sans-serif; color: var(--text); background: var(--bg);
         display: flex; height: 100vh; }
  aside { width: 250px; background: #fff; border-right: 1px solid var(--line); padding: 14px;
          display: flex; flex-direction: column; gap: 14px; overflow-y: auto; }
  aside h1 { font-size: 15px; margin: 0; }
  aside h2 { font-size: 12px; color: var(--muted); margin: 0 0 6px; font-weight: 600;
             text-transform: uppercase; letter-spacing: .04em; }
  label.opt { display: block; padding: 6px 8px; border-radius: 6px; cursor: pointer; }
  label.opt:hover { background: var(--bg); }
  label.opt input { margin-right: 6px; }
  input[type=text] { width: 100%; padding: 6px 8px; border: 1px solid var(--line);
                     border-radius: 6px; font: inherit; }
  main { flex: 1; display: flex; flex-direction: column; min-width: 0; }
  header { background: #fff; border-bottom: 1px solid var(--line); padding: 12px 18px;
           font-weight: 600; display: flex; justify-content: space-between; }
  header small { color: var(--muted); font-weight: 400; }
  #log { flex: 1; overflow-y: auto; padding: 18px; display: flex; flex-direction: column;
         gap: 12px; }
  .row { display: flex; flex-direction: column; max-width: 72%; }
  .row.me { align-self: flex-end; align-items: flex-end; }
  .row.bot { align-self: flex-start; }
  .who { font-size: 12px; color: var(--muted); margin-bottom: 2px; }
  .bubble { padding: 8px 12px; border-radius: 10px; background: #fff;
            border: 1px solid var(--line); white-space: pre-wrap; word-break: break-word; }
  .row.me .bubble { background: var(--blue); color: #fff; border-color: var(--blue); }
  .bubble pre { margin: 4px 0 0; white-space: pre-wrap; font: 13px/1.45 ui-monospace, Menlo,
                Consolas, monospace; }
  .bubble .title { font-weight: 600; }
  .bubble .btns { margin-top: 6px; display: flex; gap: 6px; flex-wrap: wrap; }
  .bubble .btns span { border: 1px solid var(--line); border-radius: 6px; padding: 2px 8px;
                       color: var(--blue); }
  .tag { font-size: 11px; color: var(--muted); margin-left: 6px; }
  .bubble.card { border-left: 3px solid var(--blue); min-width: 160px; }
  .bubble.card.failed { border-left-color: #d4380d; }
  .bubble.card .state { font-size: 11px; color: var(--muted); margin-top: 4px; }
  .bubble.card.live .state::after { content: " ▍"; color: var(--blue); }
  footer { background: #fff; border-top: 1px solid var(--line); padding: 10px 18px;
           display: flex; gap: 10px; align-items: center; }
  footer textarea { flex: 1; resize: none; height: 54px; padding: 8px;
                    border: 1px solid var(--line); border-radius: 8px; font: inherit; }
  footer button { background: var(--blue); color: #fff; border: 0; border-radius: 8px;
                  padding: 10px 18px; font: inherit; cursor: pointer; }
  footer button:disabled { opacity: .5; cursor: default; }
  #status { font-size: 12px; color: var(--muted); }
  .err { color: #d4380d; }
</style>
</head>
<body>
<aside>
  <h1>钉钉模拟器 DingTalk simulator</h1>
  <section><h2>User 用户</h2><div id="users"></div>
    <input type="text" id="customId" placeholder="custom user id 自定义用户ID">
    <input type="text" id="customNick" placeholder="nick 昵称" style="margin-top:6px">
  </section>
  <section><h2>Conversation 会话</h2><div id="convs"></div></section>
  <section><label class="opt"><input type="checkbox" id="atBot" checked>@bot in groups 群里@机器人
  </label></section>
  <div id="status">connecting…</div>
</aside>
<main>
  <header><span id="convTitle"></span><small id="whoami"></small></header>
  <div id="log"></div>
  <footer>
    <textarea id="text"
      placeholder="Type a message, Enter to send · 输入消息，回车发送"></textarea>
    <button id="send">Send 发送</button>
  </footer>
</main>
<script>
"use strict";
const CONFIG = /*__CONFIG__*/null;
const $ = (id) => document.getElementById(id);
const state = { user: CONFIG.users[0], conv: "dm", messages: [], replies: [],
                cards: new Map(), afterMsg: 0, afterReply: 0, afterCard: 0, noCards: false };

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function radio(name, value, text, checked, onChange) {
  const l = el("label", "opt"); const i = el("input");
  i.type = "radio"; i.name = name; i.value = value; i.checked = checked;
  i.addEventListener("change", onChange); l.append(i, text); return l;
}
function currentUser() {
  const id = $("customId").value.trim();
  if (document.querySelector("input[name=user]:checked").value === "__custom") {
    return { id: id || "guest", nick: $("customNick").value.trim() || id || "guest" };
  }
  return state.user;
}
function setup() {
  for (const u of CONFIG.users) {
    $("users").append(radio("user", u.id, u.nick + " (" + u.id + ")", u === state.user,
      () => { state.user = u; render(); }));
  }
  $("users").append(radio("user", "__custom", "custom 自定义", false, render));
  $("customId").addEventListener("input", render);
  $("customNick").addEventListener("input", render);
  $("convs").append(radio("conv", "dm", "1:1 with bot 单聊机器人", true,
    () => { state.conv = "dm"; render(); }));
  for (const g of CONFIG.groups) {
    $("convs").append(radio("conv", g.id, g.title, false, () => { state.conv = g.id; render(); }));
  }
  $("send").addEventListener("click", send);
  $("text").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send(); }
  });
}
function visible() {
  const u = currentUser();
  const inConv = (m) => state.conv === "dm"
    ? m.conversation_type === "1" && m.sender_id === u.id
    : m.conversation_id === state.conv;
  const msgs = state.messages.filter(inConv);
  const cids = new Set(msgs.map((m) => m.conversation_id));
  if (state.conv !== "dm") cids.add(state.conv);
  const items = msgs.map((m) => ({ t: m.created_at, kind: "msg", m }));
  for (const r of state.replies) {
    if (r.msgtype === "card") continue;  // shown live from /_sim/cards
    if (cids.has(r.conversation_id)) items.push({ t: r.received_at, kind: "reply", r });
  }
  for (const c of state.cards.values()) {
    if (cids.has(c.conversation_id)) items.push({ t: c.created_at, kind: "card", c });
  }
  items.sort((a, b) => a.t - b.t);
  return items;
}
function replyBody(r) {
  const b = r.body, box = el("div", "bubble");
  const sub = b[r.msgtype] || {};
  if (r.msgtype === "text") { box.textContent = sub.content; return box; }
  if (sub.title) box.append(el("div", "title", sub.title));
  if (r.msgtype === "markdown" || r.msgtype === "actionCard") box.append(el("pre", "", sub.text));
  if (r.msgtype === "link") box.append(el("div", "", sub.text), el("div", "tag", sub.messageUrl));
  const btns = el("div", "btns");
  if (sub.singleTitle) btns.append(el("span", "", sub.singleTitle));
  for (const x of sub.btns || []) btns.append(el("span", "", x.title));
  for (const x of sub.links || []) btns.append(el("span", "", x.title));
  if (btns.childElementCount) box.append(btns);
  return box;
}
function cardBody(c) {
  const done = c.status === "finished" || c.status === "failed";
  const box = el("div", "bubble card " + c.status + (done ? "" : " live"));
  box.append(el("pre", "", c.text || "…"));
  box.append(el("div", "state", "AI card · " + c.status));
  return box;
}
function render() {
  const u = currentUser();
  const g = CONFIG.groups.find((x) => x.id === state.conv);
  $("convTitle").textContent = g ? g.title : "1:1 · bot 机器人";
  $("whoami").textContent = "as " + u.nick + " (" + u.id + ")";
  const log = $("log");
  const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 30;
  log.replaceChildren();
  for (const it of visible()) {
    if (it.kind === "msg") {
      const m = it.m, row = el("div", "row " + (m.sender_id === u.id ? "me" : "other"));
      const who = el("div", "who", m.sender_nick);
      if (m.conversation_type === "2") who.append(el("span", "tag", m.at_bot ? "@bot" : "no @"));
      if (m.msgtype !== "text") who.append(el("span", "tag", m.msgtype));
      row.append(who, el("div", "bubble", m.text)); log.append(row);
    } else if (it.kind === "card") {
      const row = el("div", "row bot");
      const who = el("div", "who", "bot 机器人");
      who.append(el("span", "tag", "card"));
      row.append(who, cardBody(it.c)); log.append(row);
    } else {
      const row = el("div", "row bot");
      const who = el("div", "who", "bot 机器人");
      who.append(el("span", "tag", it.r.msgtype));
      row.append(who, replyBody(it.r)); log.append(row);
    }
  }
  if (stick) log.scrollTop = log.scrollHeight;
}
async function send() {
  const text = $("text").value;
  if (!text.trim()) return;
  const u = currentUser();
  const body = { text, sender_id: u.id, sender_nick: u.nick,
                 conversation_type: state.conv === "dm" ? "1" : "2",
                 at_bot: $("atBot").checked };
  if (state.conv !== "dm") body.conversation_id = state.conv;
  $("send").disabled = true;
  try {
    const res = await fetch("/_sim/messages", { method: "POST",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const out = await res.json();
    if (!res.ok) throw new Error(out.error || res.status);
    $("text").value = "";
    await tick();
  } catch (e) {
    $("status").replaceChildren(el("span", "err", "send failed: " + e.message));
  } finally { $("send").disabled = false; $("text").focus(); }
}
async function poll() {
  try {
    const [m, r] = await Promise.all([
      fetch("/_sim/messages?after=" + state.afterMsg).then((x) => x.json()),
      fetch("/_sim/replies?after=" + state.afterReply).then((x) => x.json())]);
    for (const x of m.messages) { state.messages.push(x); state.afterMsg = x.seq; }
    for (const x of r.replies) { state.replies.push(x); state.afterReply = x.seq; }
    let cardsChanged = 0;
    if (!state.noCards) {
      const res = await fetch("/_sim/cards?after=" + state.afterCard);
      if (res.status === 404) { state.noCards = true; } else {
        const c = await res.json();
        for (const x of c.cards) { state.cards.set(x.out_track_id, x); cardsChanged++; }
        state.afterCard = c.version;
      }
    }
    const s = await fetch("/_sim/state").then((x) => x.json());
    $("status").textContent = "gateway connections: " + s.connections +
      " · queued: " + s.pending + " · replies: " + s.replies +
      (s.cards ? " · cards: " + s.cards.cards : "");
    if (m.messages.length || r.replies.length || cardsChanged) render();
  } catch (e) {
    $("status").replaceChildren(el("span", "err", "simulator unreachable"));
  }
}
let polling = false;
async function tick() {
  if (polling) return;
  polling = true;
  try { await poll(); } finally { polling = false; }
}
setup(); render(); tick(); setInterval(tick, 500);
</script>
</body>
</html>
"""


def render_page(config: dict[str, Any]) -> str:
    """Return the chat page with ``config`` (preset users and groups) embedded.

    Args:
        config: ``{"users": [{"id", "nick"}], "groups": [{"id", "title"}]}``.
    """
    blob = json.dumps(config, ensure_ascii=False).replace("</", "<\\/")
    return _PAGE.replace(_CONFIG_MARK, blob, 1)
