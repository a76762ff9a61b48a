// The console's front page: the queue (oldest first) and live sessions, pushed by /ws/console/.
import { banner, clock, el, flashTitle, getJSON, since, who, wsURL } from "./common.js";

const queueList = document.getElementById("queue");
const queueEmpty = document.getElementById("queue-empty");
const queueCount = document.getElementById("queue-count");
const sessionsBody = document.getElementById("sessions");
const liveStatus = document.getElementById("live-status");
let state = JSON.parse(document.getElementById("initial-state").textContent);
let known = new Set(state.queue.map((s) => s.id));
let searching = false;

function sessionLink(session) {
  return el("a", { href: `/console/sessions/${encodeURIComponent(session.id)}/`, text: session.title || session.id });
}

function renderQueue() {
  queueList.replaceChildren(
    ...state.queue.map((s) =>
      el("li", { class: "queue-item", dataset: { session: s.id } }, [
        el("div", { class: "row" }, [
          sessionLink(s),
          el("span", { class: "waiting", dataset: { since: s.handover.requested_at }, text: `waiting ${since(s.handover.requested_at)}` }),
        ]),
        el("div", { class: "reason", text: s.handover.reason || "(no reason given)" }),
        s.handover.summary ? el("div", { class: "summary", text: s.handover.summary }) : null,
        el("div", { class: "meta" }, [
          `asked by ${who(s.handover.requested_by) || "?"} · `,
          s.user_present ? el("span", { class: "present", text: "user here" }) : el("span", { class: "absent", text: "user away" }),
          s.agents.length ? ` · agent ${s.agents.join(", ")}` : "",
        ]),
      ]),
    ),
  );
  queueEmpty.hidden = state.queue.length > 0;
  queueCount.textContent = String(state.queue.length);
}

function renderSessions(sessions) {
  sessionsBody.replaceChildren(
    ...sessions.map((s) =>
      el("tr", { dataset: { session: s.id } }, [
        el("td", {}, [sessionLink(s), el("div", { class: "meta", text: s.id })]),
        el("td", {}, [el("span", { class: `status status-${s.status}`, text: s.status.replace("_", " ") }),
          s.controller ? el("div", { class: "meta", text: `with ${who(s.controller)}` }) : null]),
        el("td", { text: s.user_present ? "yes" : "no", class: s.user_present ? "present" : "absent" }),
        el("td", { text: s.agents.join(", ") || "–" }),
        el("td", { text: clock(s.updated_at), title: s.updated_at }),
      ]),
    ),
  );
}

function apply(next) {
  const arrived = next.queue.filter((s) => !known.has(s.id));
  state = next;
  known = new Set(next.queue.map((s) => s.id));
  renderQueue();
  if (!searching) renderSessions(next.sessions);
  if (arrived.length) {
    const first = arrived[0];
    banner(`New in the queue: ${first.title || first.id} — ${first.handover.reason || "no reason"}`);
    flashTitle(`(${next.queue.length}) Human needed`);
  }
}

function connect(delay = 500) {
  const socket = new WebSocket(wsURL("/ws/console/"));
  socket.onopen = () => { liveStatus.textContent = "live"; delay = 500; };
  socket.onmessage = (message) => {
    const frame = JSON.parse(message.data);
    if (frame.op === "state") apply(frame);
  };
  socket.onclose = (event) => {
    if (event.code === 4401 || event.code === 4403) {
      liveStatus.textContent = "not allowed — log in again";
      return;
    }
    liveStatus.textContent = "reconnecting…";
    // Meanwhile, poll so the queue keeps moving.
    getJSON("/console/api/state").then(apply).catch(() => {});
    setTimeout(() => connect(Math.min(delay * 2, 8000)), delay);
  };
}

document.getElementById("search").addEventListener("submit", async (event) => {
  event.preventDefault();
  const q = document.getElementById("search-q").value.trim();
  searching = Boolean(q);
  if (!q) return renderSessions(state.sessions);
  const result = await getJSON(`/console/api/search?q=${encodeURIComponent(q)}`);
  renderSessions(result.sessions);
});
document.getElementById("search-clear").addEventListener("click", () => {
  document.getElementById("search-q").value = "";
  searching = false;
  renderSessions(state.sessions);
});

setInterval(() => {
  for (const node of document.querySelectorAll(".waiting")) node.textContent = `waiting ${since(node.dataset.since)}`;
}, 1000);

renderQueue();
renderSessions(state.sessions);
connect();
