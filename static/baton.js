// baton.js — dependency-free browser client for Baton sessions (ES module, no build step).
//
//   import { connect } from "/static/baton.js";
//   const conn = connect({ sessionId, token });
//   conn.on("message", ({ message }) => render(message));
//   await conn.sendMessage("hello");
//
// What it guarantees: after any disconnect (network drop, tab sleep, reload) it resumes from the
// last seq it processed, so the page sees every event once, in order, with no duplicated text.
// The position, the materialized messages and unacknowledged publishes are kept together in
// sessionStorage (one JSON value per session), so a reload resumes with `after` = stored seq.
// Every publish carries a `client_ref`; unacknowledged publishes are re-sent with the same ref
// after a reconnect (or a reload) and the server stores each at most once.

const FATAL_CLOSE_CODES = new Set([4400, 4401, 4403, 4404]);
// The client needs these to keep presence, status and message state right, whatever the
// caller's `types` filter; events outside the filter are not emitted as "event".
const INTERNAL_TYPES = ["presence.*", "handover.*", "session.*"];
const STATUS_BY_TYPE = {
  "handover.requested": "awaiting_human",
  "handover.claimed": "with_human",
  "handover.released": "active",
  "session.closed": "closed",
};

function uuid() {
  if (globalThis.crypto && typeof globalThis.crypto.randomUUID === "function") {
    return globalThis.crypto.randomUUID().replace(/-/g, "");
  }
  let out = "";
  for (let i = 0; i < 32; i += 1) out += Math.floor(Math.random() * 16).toString(16);
  return out;
}

function globToRegExp(glob) {
  const escaped = glob.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
  return new RegExp(`^${escaped}$`);
}

function matcher(types) {
  if (!types || types.length === 0) return () => true;
  const res = types.map(globToRegExp);
  return (type) => res.some((re) => re.test(type));
}

function defaultStorage() {
  try {
    return globalThis.sessionStorage || null;
  } catch {
    return null; // storage disabled (privacy mode, sandboxed iframe)
  }
}

function sessionIdFromUrl(url) {
  const match = /\/ws\/sessions\/([^/?#]+)/.exec(url);
  return match ? decodeURIComponent(match[1]) : null;
}

/**
 * Open a resumable connection to a Baton session.
 *
 * @param {object} options
 * @param {string} [options.url]        full ws(s):// or http(s):// URL of /ws/sessions/<id>/
 * @param {string} [options.sessionId]  or just the id; the URL is built from `location`
 * @param {string} [options.token]      client token (`ct_…`); omit for cookie-authenticated operators
 * @param {string[]} [options.types]    globs of event types to emit as "event"
 * @param {string} [options.storageKey] sessionStorage key (default `baton:<sessionId>[:types]`)
 * @param {Storage|null} [options.storage] default `sessionStorage`; `null` disables persistence
 * @param {boolean} [options.snapshot]  with nothing stored, start from a messages snapshot
 * @param {number} [options.typingThrottleMs] min gap between typing frames (default 1500)
 * @returns {BatonConnection}
 */
export function connect(options = {}) {
  return new BatonConnection(options);
}

export class BatonConnection {
  constructor(options) {
    const loc = globalThis.location;
    this.sessionId = options.sessionId || (options.url && sessionIdFromUrl(options.url));
    if (!this.sessionId) throw new Error("baton: pass `sessionId` or a /ws/sessions/<id>/ `url`");
    let url = options.url;
    if (!url) {
      const scheme = loc && loc.protocol === "https:" ? "wss" : "ws";
      url = `${scheme}://${loc.host}/ws/sessions/${encodeURIComponent(this.sessionId)}/`;
    }
    this.url = url.replace(/^http/, "ws");
    this.token = options.token || null;
    this.types = options.types && options.types.length ? [...options.types] : null;
    this.wireTypes = this.types
      ? [...new Set([...this.types, ...INTERNAL_TYPES, "message.*"])]
      : null;
    this._wants = matcher(this.types);
    this.snapshot = Boolean(options.snapshot);
    this.typingThrottleMs = options.typingThrottleMs ?? 1500;
    this.backoffBase = options.backoffBase ?? 250;
    this.backoffMax = options.backoffMax ?? 10000;
    this.pingIntervalMs = options.pingIntervalMs ?? 25000;
    this.storage = options.storage === undefined ? defaultStorage() : options.storage;
    this.storageKey =
      options.storageKey || `baton:${this.sessionId}${this.types ? `:${this.types.join(",")}` : ""}`;
    this.WebSocket = options.WebSocket || globalThis.WebSocket;

    /** Last seq processed; the next attach asks for everything after it. */
    this.lastSeq = 0;
    this.head = 0;
    /** message_id → {message_id, role, author, content, parts, status, reason, version, …} */
    this.messages = new Map();
    /** client_id → {client_id, kind, name, connections, since} */
    this.presence = new Map();
    /** Session status derived from handover events: active|awaiting_human|with_human|closed. */
    this.status = null;
    /** connecting | open | reconnecting | closed | failed */
    this.state = "connecting";
    this.connectionId = null;
    this.error = null;
    /** client_id → {author, until} of others currently typing. */
    this.typingMembers = new Map();

    this._listeners = new Map();
    this._pending = new Map(); // ref → {frame, resolve, reject, sentOn}
    this._refCounter = 0;
    this._ws = null;
    this._generation = 0;
    this._attempt = 0;
    this._timer = null;
    this._pingTimer = null;
    this._pongTimer = null;
    this._saveTimer = null;
    this._closedByUser = false;
    this._resetting = false;
    this._typingSentAt = 0;
    this._typingState = false;
    this._typingStop = null;

    this._restore();
    this._bindPageEvents();
    this._open();
  }

  // ---------------------------------------------------------------- event API

  /** on("event"|"message"|"presence"|"status"|"connection"|"typing"|"error", fn) → unsubscribe */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this.off(name, fn);
  }

  off(name, fn) {
    const set = this._listeners.get(name);
    if (set) set.delete(fn);
  }

  _emit(name, payload) {
    const set = this._listeners.get(name);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(payload);
      } catch (err) {
        console.error("baton: listener failed", err); // one bad listener must not stop the rest
      }
    }
  }

  // ---------------------------------------------------------------- persistence

  _restore() {
    if (!this.storage) return;
    let saved = null;
    try {
      saved = JSON.parse(this.storage.getItem(this.storageKey) || "null");
    } catch {
      saved = null;
    }
    if (!saved || typeof saved.lastSeq !== "number") return;
    this.lastSeq = saved.lastSeq;
    this.head = saved.lastSeq;
    this.status = saved.status ?? null;
    for (const message of saved.messages || []) this.messages.set(message.message_id, message);
    // Publishes that were not acknowledged before the reload: re-send with the same client_ref.
    for (const event of saved.pending || []) {
      this._enqueue({ op: "publish", event }).catch(() => {}); // nobody awaits these any more
    }
    if (this.messages.size) {
      queueMicrotask(() => {
        for (const message of this.messages.values()) {
          this._emit("message", { message, event: null, restored: true });
        }
      });
    }
  }

  _scheduleSave() {
    if (!this.storage || this._saveTimer) return;
    this._saveTimer = setTimeout(() => {
      this._saveTimer = null;
      this._save();
    }, 100);
  }

  _save() {
    if (!this.storage) return;
    const pending = [];
    for (const p of this._pending.values()) if (p.frame.event) pending.push(p.frame.event);
    const value = {
      lastSeq: this.lastSeq,
      status: this.status,
      messages: [...this.messages.values()],
      pending,
    };
    try {
      this.storage.setItem(this.storageKey, JSON.stringify(value));
    } catch (err) {
      console.warn("baton: could not persist session state", err); // quota: resume from 0
    }
  }

  /** Forget the stored position and messages (e.g. "clear conversation" on this device). */
  clearStorage() {
    if (this.storage) this.storage.removeItem(this.storageKey);
  }

  // ---------------------------------------------------------------- connection

  _bindPageEvents() {
    if (typeof globalThis.addEventListener !== "function") return;
    this._onOnline = () => this._wake();
    this._onVisible = () => {
      if (globalThis.document && globalThis.document.visibilityState === "visible") this._wake();
      else this._save();
    };
    this._onPageHide = () => this._save();
    globalThis.addEventListener("online", this._onOnline);
    globalThis.addEventListener("pagehide", this._onPageHide);
    if (globalThis.document) {
      globalThis.document.addEventListener("visibilitychange", this._onVisible);
    }
  }

  _unbindPageEvents() {
    if (typeof globalThis.removeEventListener !== "function") return;
    globalThis.removeEventListener("online", this._onOnline);
    globalThis.removeEventListener("pagehide", this._onPageHide);
    if (globalThis.document) {
      globalThis.document.removeEventListener("visibilitychange", this._onVisible);
    }
  }

  // Back from sleep or offline: reconnect now instead of waiting out the backoff, and check
  // that an "open" socket is really alive (a suspended tab's socket can be silently dead).
  _wake() {
    if (this._closedByUser || this.state === "failed") return;
    if (this._ws && this._ws.readyState === 1) {
      this._ping(5000);
      return;
    }
    if (this._timer) {
      clearTimeout(this._timer);
      this._timer = null;
      this._attempt = 0;
      this._open();
    }
  }

  _socketUrl() {
    const u = new URL(this.url, globalThis.location ? globalThis.location.href : undefined);
    if (this.token) u.searchParams.set("token", this.token);
    return u.toString();
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("connection", { state, ...extra });
  }

  _open() {
    if (this._closedByUser) return;
    this._generation += 1;
    const generation = this._generation;
    let ws;
    try {
      ws = new this.WebSocket(this._socketUrl());
    } catch (err) {
      this._scheduleReconnect(1006, String(err));
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      if (generation !== this._generation) return;
      const attach = { op: "attach", after: this.lastSeq };
      if (this.wireTypes) attach.types = this.wireTypes;
      if (this.snapshot && this.lastSeq === 0) attach.snapshot = true;
      ws.send(JSON.stringify(attach));
      // Everything unacknowledged goes again, in its original order, before anything new.
      for (const p of this._pending.values()) {
        ws.send(JSON.stringify(p.frame));
        p.sentOn = generation;
      }
      this._startPing();
    };
    ws.onmessage = (msg) => {
      if (generation !== this._generation) return;
      let frame;
      try {
        frame = JSON.parse(msg.data);
      } catch {
        return;
      }
      this._onFrame(frame);
    };
    ws.onclose = (ev) => {
      if (generation !== this._generation) return;
      this._ws = null;
      this._stopPing();
      if (this._closedByUser) return;
      if (this._resetting) {
        // We just dropped a position the server refused (bad_after): start over from 0.
        this._resetting = false;
        this._scheduleReconnect(ev.code, "reset");
      } else if (FATAL_CLOSE_CODES.has(ev.code)) {
        this._fail(ev.code, ev.reason);
      } else {
        this._scheduleReconnect(ev.code, ev.reason);
      }
    };
    ws.onerror = () => {}; // onclose follows and decides
  }

  _scheduleReconnect(code, reason) {
    const ceiling = Math.min(this.backoffMax, this.backoffBase * 2 ** this._attempt);
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this._attempt += 1;
    this._setState("reconnecting", { code, reason, attempt: this._attempt, delay });
    this._timer = setTimeout(() => {
      this._timer = null;
      this._open();
    }, delay);
  }

  _fail(code, reason) {
    const err = new Error(`baton: connection refused (${code}${reason ? ` ${reason}` : ""})`);
    err.code = code;
    this.error = err;
    for (const p of this._pending.values()) p.reject(err);
    this._pending.clear();
    this._unbindPageEvents();
    this._setState("failed", { code, reason });
  }

  _startPing() {
    this._stopPing();
    this._pingTimer = setInterval(() => this._ping(10000), this.pingIntervalMs);
  }

  _stopPing() {
    clearInterval(this._pingTimer);
    clearTimeout(this._pongTimer);
    this._pingTimer = null;
    this._pongTimer = null;
  }

  // App-level liveness check: no pong in time means the socket is dead; close and resume.
  _ping(timeoutMs) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1 || this._pongTimer) return;
    ws.send(JSON.stringify({ op: "ping" }));
    this._pongTimer = setTimeout(() => {
      this._pongTimer = null;
      if (this._ws === ws) ws.close(4000, "no pong");
    }, timeoutMs);
  }

  /** Close for good (clean close: presence.leave reason `closed`, never a cancel). */
  close() {
    this._closedByUser = true;
    clearTimeout(this._timer);
    this._stopPing();
    this._save();
    this._unbindPageEvents();
    if (this._ws) this._ws.close(1000);
    this._ws = null;
    this._setState("closed");
  }

  // ---------------------------------------------------------------- inbound

  _onFrame(frame) {
    switch (frame.op) {
      case "events":
        for (const event of frame.events || []) this._onEvent(event);
        this._scheduleSave();
        break;
      case "snapshot":
        this._onSnapshot(frame);
        break;
      case "attached":
        this._onAttached(frame);
        break;
      case "ack": {
        const p = this._pending.get(frame.ref);
        if (p) {
          this._pending.delete(frame.ref);
          p.resolve(frame);
          this._scheduleSave();
        }
        break;
      }
      case "error":
        this._onError(frame);
        break;
      case "ephemeral":
        if (frame.type === "typing") this._onTyping(frame);
        break;
      case "pong":
        clearTimeout(this._pongTimer);
        this._pongTimer = null;
        break;
      default:
        break;
    }
  }

  _onError(frame) {
    const err = new Error(frame.message || frame.code);
    err.code = frame.code;
    const p = frame.ref != null ? this._pending.get(frame.ref) : null;
    if (p) {
      this._pending.delete(frame.ref);
      p.reject(err);
      this._scheduleSave();
      return;
    }
    if (frame.code === "bad_after") {
      // The stored position is beyond the server's head (the session was reset): start over.
      // The server closes with 4400 next; that close must not count as fatal.
      this.lastSeq = 0;
      this.head = 0;
      this.status = null;
      this.messages.clear();
      this.clearStorage();
      this._resetting = true;
      this._emit("reset", { reason: frame.message });
      if (this._ws) this._ws.close(4000, "reset");
    }
    this._emit("error", err);
  }

  _onAttached(frame) {
    this._attempt = 0;
    this.head = Math.max(this.head, frame.head || 0);
    this.connectionId = frame.connection_id || null;
    this.presence = new Map((frame.presence || []).map((m) => [m.client_id, m]));
    this._emit("presence", { members: this.presence, change: "sync", member: null });
    this._setState("open", { head: this.head, replayed: frame.replayed || 0 });
  }

  _onSnapshot(frame) {
    for (const message of frame.messages || []) this.messages.set(message.message_id, message);
    this.lastSeq = Math.max(this.lastSeq, frame.seq || 0);
    for (const message of this.messages.values()) {
      this._emit("message", { message, event: null, restored: true });
    }
    this._fetchStatus();
  }

  // Only needed after a snapshot, where the handover events before it are not replayed.
  async _fetchStatus() {
    try {
      const u = new URL(this._socketUrl());
      u.protocol = u.protocol === "wss:" ? "https:" : "http:";
      const api = `${u.origin}/api/v1/sessions/${encodeURIComponent(this.sessionId)}`;
      const headers = this.token ? { Authorization: `Bearer ${this.token}` } : {};
      const res = await fetch(api, { headers, credentials: "same-origin" });
      if (!res.ok) return;
      const body = await res.json();
      if (this.status === null && body.status) {
        this.status = body.status;
        this._emit("status", { status: this.status, event: null });
      }
    } catch {
      // best effort: the next handover event sets the status anyway
    }
  }

  _onEvent(event) {
    if (event.seq <= this.lastSeq) return; // already processed: a replay overlap
    this.lastSeq = event.seq;
    this.head = Math.max(this.head, event.seq);
    const type = event.type;
    if (type.startsWith("message.")) this._applyMessage(event);
    else if (type.startsWith("presence.")) this._applyPresence(event);
    if (STATUS_BY_TYPE[type]) {
      this.status = STATUS_BY_TYPE[type];
      this._emit("status", { status: this.status, event });
    }
    if (this._wants(type)) this._emit("event", event);
  }

  _applyMessage(event) {
    const id = event.message_id;
    const data = event.data || {};
    let message = this.messages.get(id);
    if (event.type === "message.create") {
      message = {
        message_id: id,
        role: data.role,
        author: event.author,
        content: data.content || "",
        parts: data.parts ?? null,
        status: data.status || "complete",
        reason: null,
        version: 1,
        created_seq: event.seq,
        last_seq: event.seq,
      };
      this.messages.set(id, message);
    } else {
      if (!message) return; // its create is before our position (snapshot-less filter)
      if (event.type === "message.append") message.content += data.delta || "";
      else if (event.type === "message.update") {
        message.content = data.content ?? "";
        if (data.parts !== undefined) message.parts = data.parts;
      } else if (event.type === "message.complete") {
        message.status = data.status || "complete";
        message.reason = data.reason ?? null;
      }
      message.version += 1;
      message.last_seq = event.seq;
    }
    this._emit("message", { message, event });
  }

  _applyPresence(event) {
    const data = event.data || {};
    if (!data.client_id) return;
    let change = null;
    if (event.type === "presence.enter") {
      // The `attached` list may already hold a member whose enter event is live after it.
      const known = this.presence.has(data.client_id);
      this.presence.set(data.client_id, { ...(this.presence.get(data.client_id) || {}), ...data });
      change = known ? null : "enter";
    } else if (event.type === "presence.leave") {
      change = this.presence.delete(data.client_id) ? "leave" : null;
      this.typingMembers.delete(data.client_id);
    } else if (event.type === "presence.update" && this.presence.has(data.client_id)) {
      Object.assign(this.presence.get(data.client_id), data);
      change = "update";
    }
    if (change) {
      this._emit("presence", { members: this.presence, change, member: data, event });
    }
  }

  _onTyping(frame) {
    const author = frame.author || {};
    const key = author.id;
    if (!key) return;
    if (frame.state) {
      // A typing "true" that is never followed by "false" (closed tab) expires on its own.
      const until = Date.now() + Math.max(6000, this.typingThrottleMs * 3);
      this.typingMembers.set(key, { author, until });
      setTimeout(() => {
        const entry = this.typingMembers.get(key);
        if (entry && entry.until <= Date.now()) {
          this.typingMembers.delete(key);
          this._emit("typing", { author, state: false, typing: this.whoIsTyping() });
        }
      }, until - Date.now() + 10);
    } else {
      this.typingMembers.delete(key);
    }
    this._emit("typing", { author, state: Boolean(frame.state), typing: this.whoIsTyping() });
  }

  /** `[{author, until}]` of others typing now (the server does not echo our own typing). */
  whoIsTyping() {
    return [...this.typingMembers.values()];
  }

  // ---------------------------------------------------------------- outbound

  _enqueue(frame) {
    this._refCounter += 1;
    const ref = `js${this._refCounter}`;
    frame.ref = ref;
    if (frame.event && !frame.event.client_ref) frame.event.client_ref = `cr_${uuid()}`;
    if (frame.events) {
      for (const e of frame.events) if (!e.client_ref) e.client_ref = `cr_${uuid()}`;
    }
    return new Promise((resolve, reject) => {
      const p = { frame, resolve, reject, sentOn: 0 };
      this._pending.set(ref, p);
      const ws = this._ws;
      if (ws && ws.readyState === 1) {
        ws.send(JSON.stringify(frame));
        p.sentOn = this._generation;
      }
      this._scheduleSave();
    });
  }

  /**
   * Publish one event; resolves with the ack `{seq, id, message_id, duplicate}` and rejects
   * with an Error carrying the server's `code`. Survives reconnects and reloads: the same
   * `client_ref` is re-sent until acknowledged, so it is stored at most once.
   */
  publish(event) {
    if (this.error) return Promise.reject(this.error);
    if (this._closedByUser) return Promise.reject(new Error("baton: connection closed"));
    return this._enqueue({ op: "publish", event: { data: {}, ...event } });
  }

  /** A user message, complete in one event (`message.create`, role user). */
  sendMessage(text, { parts, messageId } = {}) {
    const data = { role: "user", content: text, status: "complete" };
    if (parts) data.parts = parts;
    return this.publish({
      type: "message.create",
      message_id: messageId || `msg_${uuid()}`,
      data,
    });
  }

  /** Ask the agent to stop: one message (by id) or, without an id, whatever it is doing. */
  cancel(messageId, reason) {
    const data = {};
    if (messageId) data.message_id = messageId;
    if (reason) data.reason = reason;
    return this.publish({ type: "signal.cancel", data });
  }

  /** Steer the agent mid-answer. */
  redirect(text) {
    return this.publish({ type: "signal.redirect", data: { text } });
  }

  /**
   * Typing indicator (ephemeral, never stored). `true` is sent at most once per
   * `typingThrottleMs` and turns itself off after a quiet spell; `false` is sent at once.
   */
  typing(state = true) {
    const ws = this._ws;
    clearTimeout(this._typingStop);
    if (state) {
      this._typingStop = setTimeout(() => this.typing(false), this.typingThrottleMs * 2);
      const now = Date.now();
      if (this._typingState && now - this._typingSentAt < this.typingThrottleMs) return;
      this._typingSentAt = now;
    } else if (!this._typingState) {
      return;
    }
    this._typingState = Boolean(state);
    if (ws && ws.readyState === 1) ws.send(JSON.stringify({ op: "typing", state: Boolean(state) }));
  }

  /** Messages in conversation order (by the seq that created them). */
  messageList() {
    return [...this.messages.values()].sort((a, b) => (a.created_seq || 0) - (b.created_seq || 0));
  }
}

export default { connect };
