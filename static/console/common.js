// Shared helpers of the operator console. Every piece of data reaches the DOM through
// textContent or attributes set one by one, never parsed as markup: hostile content stays text.

export function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

export async function postJSON(url, body = {}) {
  const response = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
    body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error((data.error && data.error.message) || response.statusText);
    error.code = data.error && data.error.code;
    error.status = response.status;
    throw error;
  }
  return data;
}

export async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

export function wsURL(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

export function since(ts, now = Date.now()) {
  const seconds = Math.max(0, Math.round((now - Date.parse(ts)) / 1000));
  if (seconds < 60) return `${seconds}s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes}m ${seconds % 60}s`;
  return `${Math.floor(minutes / 60)}h ${minutes % 60}m`;
}

export function clock(ts) {
  const d = new Date(ts);
  return isNaN(d) ? "" : d.toLocaleTimeString([], { hour12: false });
}

export function who(author) {
  if (!author) return "";
  return author.name || author.id || author.kind;
}

export function banner(text) {
  const node = document.getElementById("banner");
  if (!node) return;
  node.textContent = text;
  node.hidden = false;
  clearTimeout(banner.timer);
  banner.timer = setTimeout(() => (node.hidden = true), 8000);
}

// Flash the tab title until the page is looked at again (no sound).
export function flashTitle(text) {
  const original = flashTitle.original || (flashTitle.original = document.title);
  clearInterval(flashTitle.timer);
  let on = false;
  flashTitle.timer = setInterval(() => {
    on = !on;
    document.title = on ? text : original;
  }, 800);
  const stop = () => {
    clearInterval(flashTitle.timer);
    document.title = original;
    window.removeEventListener("focus", stop);
    document.removeEventListener("click", stop);
  };
  window.addEventListener("focus", stop);
  document.addEventListener("click", stop);
}
