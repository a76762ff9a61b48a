// One session in the console: full history from seq 1, live, with a composer, internal notes,
// claim / release / close, typing indicators and a diagnostics tab. Speaks the WebSocket
// protocol directly (docs/protocol.md) over the operator's session cookie.
import { clock, el, getJSON, postJSON, who, wsURL } from "./common.js";

const session = JSON.parse(document.getElementById("session-data").textContent);
const sid = session.id;
const $ = (id) => document.getElementById(id);
const history = $("history");
const messages = new Map(); // message_id -> {content, status}
const presence = new Map(); // client_id -> member
const typingBy = new Map(); // author id -> {name, timer}
let lastSeq = 0;
let socket = null;
let refs = 0;
const pending = new Map(); // ref -> callback(frame)
let receivedSent = 0;

$("session-title").textContent = session.title || "Untitled session";
$("session-id").textContent = sid;
$("export").href = `/api/v1/sessions/${encodeURIComponent(sid)}/export`;

// ------------------------------------------------------------------ status and actions

function setStatus(status, controller) {
  session.status = status;
  session.controller = controller;
  $("status").textContent = status.replace("_", " ");
  $("status").className = `status status-${status}`;
  $("controller").textContent = controller ? ` by ${who(controller)}` : "";
  $("claim").disabled = !["active", "awaiting_human"].includes(status);
  $("release").disabled = !["with_human", "awaiting_human"].includes(status);
  $("close").disabled = status === "closed";
  for (const id of ["composer-text", "send", "note"]) $(id).disabled = status === "closed";
}

function showError(error) {
  const node = $("action-error");
  node.textContent = error ? `${error.code || "error"}: ${error.message}` : "";
  node.hidden = !error;
}

async function transition(action) {
  showError(null);
  try {
    const result = await postJSON(`/api/v1/sessions/${encodeURIComponent(sid)}/${action}`);
    setStatus(result.session.status, result.session.controller);
  } catch (error) {
    showError(error);
  }
}
$("claim").addEventListener("click", () => transition("claim"));
$("release").addEventListener("click", () => transition("release"));
$("close").addEventListener("click", () => {
  if (confirm("Close this session for everyone?")) transition("close");
});

// ------------------------------------------------------------------ rendering

function nearBottom() {
  return history.scrollHeight - history.scrollTop - history.clientHeight < 80;
}

function line(kind, event, children) {
  return el("div", { class: `event ${kind}`, dataset: { seq: event.seq, type: event.type } }, [
    el("span", { class: "time", text: clock(event.ts), title: `#${event.seq} ${event.ts}` }),
    ...children,
  ]);
}

function messageNode(event) {
  const data = event.data || {};
  const role = data.role || "assistant";
  const content = el("div", { class: "content", text: data.content || "" });
  const status = el("span", { class: "msg-status", text: data.status === "complete" ? "" : "streaming…" });
  const node = el("article", { class: `msg role-${role}`, dataset: { messageId: event.message_id, seq: event.seq } }, [
    el("header", {}, [
      el("strong", { class: "author", text: who(event.author) }),
      el("span", { class: "role", text: role }),
      el("span", { class: "time", text: clock(event.ts), title: `#${event.seq} ${event.ts}` }),
      status,
    ]),
    content,
  ]);
  messages.set(event.message_id, { node, content, status });
  return node;
}

function render(event) {
  const type = event.type;
  const data = event.data || {};
  const author = who(event.author);
  if (type === "message.create") {
    // A message ends its author's typing, whatever the client forgot to send.
    const key = `${event.author.kind}:${event.author.id}`;
    if (typingBy.has(key)) { clearTimeout(typingBy.get(key).timer); typingBy.delete(key); renderTyping(); }
    return messageNode(event);
  }
  if (type.startsWith("message.")) {
    const message = messages.get(event.message_id);
    if (!message) return null;
    if (type === "message.append") message.content.textContent += data.delta || "";
    else if (type === "message.update") message.content.textContent = data.content || "";
    else if (type === "message.complete")
      message.status.textContent = data.status && data.status !== "complete" ? data.status : "";
    return null;
  }
  if (type.startsWith("progress.")) {
    const label = data.name || data.tool || data.step || data.text || "";
    return el("details", { class: "event progress", dataset: { seq: event.seq, type } }, [
      el("summary", {}, [
        el("span", { class: "time", text: clock(event.ts) }),
        el("span", { class: "tag", text: type }),
        ` ${author}${label ? ` · ${label}` : ""}`,
      ]),
      el("pre", { text: JSON.stringify(data, null, 2) }),
    ]);
  }
  if (type.startsWith("signal.")) {
    const detail = data.text || data.reason || data.message_id || "";
    return line("signal", event, [el("span", { class: "tag", text: type }), ` ${author}${detail ? `: ${detail}` : ""}`]);
  }
  if (type.startsWith("presence.")) {
    if (type === "presence.enter") presence.set(data.client_id, { client_id: data.client_id, kind: data.kind, name: data.name });
    if (type === "presence.leave") presence.delete(data.client_id);
    renderPresence();
    const verb = type === "presence.enter" ? "joined" : type === "presence.leave" ? `left (${data.reason || "?"})` : "updated presence";
    return line("presence", event, [`${data.name || data.client_id} (${data.kind}) ${verb}`]);
  }
  if (type === "handover.requested") {
    if (session.status === "active") setStatus("awaiting_human", null);
    return line("handover", event, [
      el("strong", { text: `${author} asked for a human` }),
      data.reason ? `: ${data.reason}` : "",
      data.summary ? el("div", { class: "summary", text: data.summary }) : null,
    ]);
  }
  if (type === "handover.claimed") {
    setStatus("with_human", event.author);
    return line("handover", event, [el("strong", { text: `${author} took over` })]);
  }
  if (type === "handover.released") {
    setStatus("active", null);
    return line("handover", event, [el("strong", { text: `${author} handed back to the agent` }), data.reason ? `: ${data.reason}` : ""]);
  }
  if (type === "session.closed") {
    setStatus("closed", null);
    return line("handover", event, [el("strong", { text: `${author} closed the session` }), data.reason ? `: ${data.reason}` : ""]);
  }
  if (type === "note.internal") {
    return el("div", { class: "event note", dataset: { seq: event.seq, type } }, [
      el("span", { class: "time", text: clock(event.ts) }),
      el("span", { class: "tag", text: "internal note" }),
      ` ${author}: `,
      el("span", { class: "note-text", text: data.text || "" }),
    ]);
  }
  if (type.startsWith("connection.")) {
    timeline(event);
    return null;
  }
  return line("other", event, [el("span", { class: "tag", text: type }), ` ${author}`]);
}

function onEvents(events) {
  const stick = nearBottom();
  const fragment = document.createDocumentFragment();
  for (const event of events) {
    if (event.seq <= lastSeq) continue;
    lastSeq = event.seq;
    const node = render(event);
    if (node) fragment.append(node);
  }
  history.append(fragment);
  if (stick) history.scrollTop = history.scrollHeight;
  acknowledge();
}

// Report the delivery position (diagnostics), always the latest. A little over the server's 1 s
// flush window, so a trailing ack is stored rather than held until the next frame.
const ACK_EVERY_MS = 1200;
let ackTimer = null;
function acknowledge() {
  if (ackTimer) return;
  const wait = Math.max(0, ACK_EVERY_MS - (Date.now() - receivedSent));
  ackTimer = setTimeout(() => {
    ackTimer = null;
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    receivedSent = Date.now();
    socket.send(JSON.stringify({ op: "received", seq: lastSeq }));
  }, wait);
}

function renderPresence() {
  $("presence").replaceChildren(
    ...[...presence.values()].map((m) =>
      el("li", { class: `member kind-${m.kind}` }, [el("strong", { text: m.name || m.client_id }), ` ${m.kind}`]),
    ),
  );
}

function renderTyping() {
  const names = [...typingBy.values()].map((t) => t.name);
  $("typing").hidden = names.length === 0;
  $("typing").textContent = names.length ? `${names.join(", ")} typing…` : "";
}

function onTyping(frame) {
  const author = frame.author || {};
  const key = `${author.kind}:${author.id}`;
  const current = typingBy.get(key);
  if (current) clearTimeout(current.timer);
  if (frame.state) {
    typingBy.set(key, { name: who(author), timer: setTimeout(() => { typingBy.delete(key); renderTyping(); }, 6000) });
  } else {
    typingBy.delete(key);
  }
  renderTyping();
}

// ------------------------------------------------------------------ the socket

function connect(delay = 500) {
  socket = new WebSocket(wsURL(`/ws/sessions/${encodeURIComponent(sid)}/?after=${lastSeq}`));
  $("conn-state").textContent = "connecting…";
  socket.onmessage = (message) => {
    const frame = JSON.parse(message.data);
    if (frame.op === "events") onEvents(frame.events);
    else if (frame.op === "attached") {
      delay = 500;
      $("conn-state").textContent = "live";
      if (frame.status) setStatus(frame.status, frame.controller || null);
      presence.clear();
      for (const m of frame.presence || []) presence.set(m.client_id, m);
      renderPresence();
      acknowledge();
    } else if (frame.op === "ephemeral" && frame.type === "typing") onTyping(frame);
    else if ((frame.op === "ack" || frame.op === "error") && pending.has(frame.ref)) {
      pending.get(frame.ref)(frame);
      pending.delete(frame.ref);
    } else if (frame.op === "error") showError(frame);
  };
  socket.onclose = (event) => {
    $("conn-state").textContent = `disconnected (${event.code})`;
    for (const callback of pending.values()) callback({ op: "error", code: "disconnected", message: "Connection lost; not sent." });
    pending.clear();
    if ([4401, 4403, 4404].includes(event.code)) return;
    setTimeout(() => connect(Math.min(delay * 2, 8000)), delay);
  };
}

function publish(event) {
  return new Promise((resolve) => {
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      resolve({ op: "error", code: "disconnected", message: "Not connected." });
      return;
    }
    const ref = `c${++refs}`;
    pending.set(ref, resolve);
    socket.send(JSON.stringify({ op: "publish", ref, event }));
  });
}

// ------------------------------------------------------------------ composer and typing

let typingSentAt = 0;
function sendTyping(state) {
  if (!socket || socket.readyState !== WebSocket.OPEN) return;
  socket.send(JSON.stringify({ op: "typing", state }));
  typingSentAt = state ? Date.now() : 0;
}
$("composer-text").addEventListener("input", () => {
  const empty = !$("composer-text").value.trim();
  if (empty && typingSentAt) sendTyping(false);
  else if (!empty && Date.now() - typingSentAt > 2500) sendTyping(true);
});
$("composer-text").addEventListener("blur", () => typingSentAt && sendTyping(false));

async function submit(kind) {
  const box = $("composer-text");
  const text = box.value.trim();
  if (!text) return;
  showError(null);
  const event = kind === "note"
    ? { type: "note.internal", data: { text } }
    : { type: "message.create", data: { role: "operator", content: text, status: "complete" } };
  event.client_ref = `console-${Date.now()}-${Math.random().toString(36).slice(2, 8)}`;
  // Cleared now, not on the ack: what the operator types meanwhile must not be wiped by it.
  box.value = "";
  if (typingSentAt) sendTyping(false);
  const answer = await publish(event);
  if (answer.op === "error") {
    if (!box.value.trim()) box.value = text; // back in the box, to fix or send again
    showError(answer);
  }
}
$("composer").addEventListener("submit", (event) => { event.preventDefault(); submit("message"); });
$("composer-text").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); submit("message"); }
});
$("note").addEventListener("click", () => submit("note"));

// ------------------------------------------------------------------ diagnostics

function timeline(event) {
  const d = event.data || {};
  const detail = event.type === "connection.closed"
    ? `code ${d.code ?? "?"} (${d.reason || "?"}), last received #${d.last_received_seq ?? "–"}`
    : `after #${d.after ?? 0}, replayed ${d.replayed ?? 0}`;
  $("diag-timeline").append(
    el("li", { class: event.type.replace(".", "-") }, [
      el("span", { class: "time", text: clock(event.ts) }),
      el("span", { class: "tag", text: event.type.split(".")[1] }),
      ` ${d.client_id || who(event.author)} (${d.kind || event.author.kind}) `,
      el("code", { text: d.connection_id || "" }),
      ` ${detail}`,
    ]),
  );
  if (!$("pane-diagnostics").hidden) refreshDiagnostics();
}

async function refreshDiagnostics() {
  try {
    const diag = await getJSON(`/console/api/sessions/${encodeURIComponent(sid)}/diagnostics`);
    $("diag-head").textContent = String(diag.head);
    $("diag-connections").replaceChildren(
      ...diag.connections.map((c) =>
        el("tr", { class: c.open ? "open" : "closed" }, [
          el("td", {}, [el("code", { text: c.id }), el("div", { class: "meta", text: c.user_agent })]),
          el("td", { text: `${c.name || c.client_id} (${c.kind})` }),
          el("td", { text: `${clock(c.opened_at)} after #${c.after}, replayed ${c.replayed}` }),
          el("td", { text: c.open ? "open" : `${clock(c.closed_at)} (${c.close_code ?? "?"}, ${c.close_reason || "?"})` }),
          el("td", { text: c.last_received_seq === null ? "–" : `#${c.last_received_seq}${c.ack_age_seconds !== null ? ` · ${c.ack_age_seconds}s ago` : ""}` }),
          el("td", { text: c.lag_events === null ? "–" : `${c.lag_events} events` }),
        ]),
      ),
    );
  } catch (error) {
    showError({ code: "diagnostics", message: error.message });
  }
}

function selectTab(name) {
  const diagnostics = name === "diagnostics";
  $("tab-history").setAttribute("aria-selected", String(!diagnostics));
  $("tab-diagnostics").setAttribute("aria-selected", String(diagnostics));
  $("pane-history").hidden = diagnostics;
  $("pane-diagnostics").hidden = !diagnostics;
  if (diagnostics) refreshDiagnostics();
}
$("tab-history").addEventListener("click", () => selectTab("history"));
$("tab-diagnostics").addEventListener("click", () => selectTab("diagnostics"));
setInterval(() => { if (!$("pane-diagnostics").hidden) refreshDiagnostics(); }, 2000);

for (const m of session.presence || []) presence.set(m.client_id, m);
renderPresence();
setStatus(session.status, session.controller);
connect();
