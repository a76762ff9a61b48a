// The demo chat page: everything it shows comes from baton.js state, rendered with textContent.
import { connect } from "/static/baton.js";

const root = document.getElementById("demo");
const transcript = document.getElementById("transcript");
const membersBox = document.getElementById("members");
const statusPill = document.getElementById("status");
const connectionPill = document.getElementById("connection");
const typingBox = document.getElementById("typing");
const form = document.getElementById("composer");
const input = document.getElementById("input");
const stopButton = document.getElementById("stop");
const humanButton = document.getElementById("human");

const conn = connect({ sessionId: root.dataset.session, token: root.dataset.token });
window.batonDemo = conn; // for tests and the curious

const nodes = new Map(); // key -> element, key = "m:<message_id>" or "e:<seq>"

function place(node, seq) {
  node.dataset.seq = String(seq);
  for (const child of transcript.children) {
    if (Number(child.dataset.seq) > seq) {
      transcript.insertBefore(node, child);
      return;
    }
  }
  transcript.appendChild(node);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderMessage(message) {
  const key = `m:${message.message_id}`;
  let node = nodes.get(key);
  if (!node) {
    node = el("div", `msg role-${message.role}`);
    node.dataset.messageId = message.message_id;
    node.append(el("div", "who"), el("div", "content"), el("div", "meta muted"));
    nodes.set(key, node);
    place(node, message.created_seq);
  }
  const who = message.role === "user" ? (message.author?.id === root.dataset.client ? "You" : message.author?.name || "User")
    : message.role === "operator" ? `${message.author?.name || "Operator"} (human)`
    : message.author?.name || "Assistant";
  node.querySelector(".who").textContent = who;
  node.querySelector(".content").textContent = message.content;
  node.dataset.status = message.status;
  node.querySelector(".meta").textContent =
    message.status === "streaming" ? "typing…" : message.status === "complete" ? "" : message.status;
  updateStop();
}

function renderEvent(event) {
  const key = `e:${event.seq}`;
  if (nodes.has(key)) return;
  let text;
  if (event.type.startsWith("progress.")) {
    const name = event.data?.name || event.data?.tool || event.type.slice("progress.".length);
    const detail = event.data?.status || event.data?.summary || "";
    text = `⚙ ${name}${detail ? ` — ${detail}` : ""}`;
  } else if (event.type === "signal.cancel") {
    text = "⏹ stop requested";
  } else if (event.type === "signal.redirect") {
    text = `↪ redirect: ${event.data?.text ?? ""}`;
  } else if (event.type === "handover.requested") {
    text = `🙋 a human was requested${event.data?.reason ? `: ${event.data.reason}` : ""}`;
  } else if (event.type === "handover.claimed") {
    text = `👤 ${event.author?.name || "An operator"} joined the conversation`;
  } else if (event.type === "handover.released") {
    text = "🤖 back to the assistant";
  } else if (event.type === "session.closed") {
    text = "conversation closed";
  } else {
    return;
  }
  const node = el("div", `event ${event.type.split(".")[0]}`, text);
  node.dataset.type = event.type;
  nodes.set(key, node);
  place(node, event.seq);
}

function streamingAssistant() {
  for (const message of conn.messages.values()) {
    if (message.status === "streaming" && message.role !== "user") return message;
  }
  return null;
}

function updateStop() {
  stopButton.disabled = !streamingAssistant();
}

function renderMembers() {
  membersBox.replaceChildren();
  for (const member of conn.presence.values()) {
    const label = member.client_id === root.dataset.client ? "You" : member.name || member.client_id;
    const item = el("span", `member kind-${member.kind}`, `● ${label}`);
    item.title = `${member.kind}, ${member.connections ?? 1} connection(s)`;
    membersBox.appendChild(item);
  }
}

conn.on("message", ({ message }) => renderMessage(message));
conn.on("event", (event) => renderEvent(event));
conn.on("presence", renderMembers);
conn.on("status", ({ status }) => {
  statusPill.dataset.status = status || "";
  statusPill.textContent = (status || "").replace("_", " ");
  humanButton.disabled = status !== "active";
  input.disabled = status === "closed";
});
conn.on("connection", ({ state }) => {
  connectionPill.dataset.state = state;
  connectionPill.textContent = state;
});
conn.on("typing", ({ typing }) => {
  const names = [...typing.values()].map((t) => t.author?.name || t.author?.id).filter(Boolean);
  typingBox.textContent = names.length ? `${names.join(", ")} typing…` : "";
});
conn.on("reset", () => {
  nodes.clear();
  transcript.replaceChildren();
});

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  conn.typing(false);
  try {
    await conn.sendMessage(text);
  } catch (err) {
    alert(`Not sent: ${err.message}`);
  }
});
input.addEventListener("input", () => conn.typing(input.value.length > 0));
stopButton.addEventListener("click", () => {
  const message = streamingAssistant();
  if (message) conn.cancel(message.message_id, "user pressed stop");
});
humanButton.addEventListener("click", () =>
  conn.publish({ type: "handover.requested", data: { reason: "The user asked for a human." } })
    .catch((err) => alert(err.message)),
);
