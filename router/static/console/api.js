// The console's one way to talk to the router: JSON calls with the session cookie, the
// agent's event stream, and two small helpers every page needs. Plain ES module, no build.
//
// The session cookie is HttpOnly, so the page never sees it; what the page keeps (in memory
// only, never in storage or the URL) is the CSRF token the session call answers, sent back on
// every state-changing call as the router asks.

/** An error answer of the API: `{"error": {"code", "message", "details"}}`. */
export class ApiError extends Error {
  constructor(status, code, message, details = null) {
    super(message || code || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

const UNSAFE = new Set(["POST", "PUT", "PATCH", "DELETE"]);
let csrfToken = null;

/** Calls the API; answers the parsed JSON (null on 204), or throws ApiError. */
export async function api(method, path, body = undefined, { idempotencyKey } = {}) {
  method = method.toUpperCase();
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (UNSAFE.has(method) && csrfToken) headers["X-CSRF-Token"] = csrfToken;
  if (idempotencyKey) headers["Idempotency-Key"] = idempotencyKey;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, "network_error", "The router cannot be reached.", String(err));
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(
      response.status,
      error.code || `http_${response.status}`,
      error.message || response.statusText,
      error.details ?? null,
    );
  }
  return data;
}

/** The current session (`{role, agent_id, name, csrf_token, expires_at}`), or null. */
export async function session() {
  try {
    const current = await api("GET", "/api/session");
    csrfToken = current.csrf_token;
    return current;
  } catch (err) {
    if (err instanceof ApiError && (err.status === 401 || err.status === 404)) {
      csrfToken = null;
      return null;
    }
    throw err;
  }
}

/** Opens a session with an agent or admin token; the token itself is not kept. */
export async function signIn(token, name = undefined) {
  const body = { token };
  if (name) body.name = name;
  const created = await api("POST", "/api/session", body);
  csrfToken = created.csrf_token;
  return created;
}

/** Ends the session (the router clears the cookie). */
export async function signOut() {
  try {
    await api("DELETE", "/api/session");
  } finally {
    csrfToken = null;
  }
}

// EventSource only hands named events (`event: <type>`) to listeners of that exact name, so
// every type the stream may send is listened to by name
// (https://html.spec.whatwg.org/multipage/server-sent-events.html#dispatchMessage).
export const EVENT_TYPES = [
  "message.received",
  "message.status",
  "message.send-requested",
  "message.sent",
  "message.rejected",
  "message.failed",
  "message.delivered",
  "message.read",
  "conversation.opened",
  "conversation.classified",
  "conversation.queued",
  "conversation.offered",
  "conversation.assigned",
  "conversation.transferred",
  "conversation.closed",
  "conversation.ended",
  "conversation.reopened",
  "conversation.waiting",
  "conversation.overflowed",
  "offer.declined",
  "offer.expired",
  "agent.presence-changed",
  "supervisor.acted",
  "reset",
];

const RETRY_MS = [1000, 2000, 5000, 10000, 30000]; // when the browser gave the stream up

/**
 * Opens the agent's event stream. `onEvent(envelope)` gets every event (a `reset` comes as
 * `{type: "reset"}` when the router sends no data with it); `onState("open" |
 * "reconnecting")` follows the connection. EventSource reconnects by itself after a drop and
 * sends Last-Event-ID, so the stream resumes where it was. It gives up for good when an
 * answer is not a 200 text/event-stream (a 401, a 503 while the router restarts)
 * (https://html.spec.whatwg.org/multipage/server-sent-events.html#the-eventsource-interface,
 * "fail the connection"); then a new one is opened after a pause. Answers a function that
 * closes the stream.
 */
export function subscribe(onEvent, onState = () => {}) {
  let source = null;
  let retry = null;
  let failures = 0;
  let closed = false;
  const deliver = (type) => (message) => {
    let envelope;
    try {
      envelope = message.data ? JSON.parse(message.data) : {};
    } catch {
      envelope = {};
    }
    if (!envelope || typeof envelope !== "object") envelope = {};
    if (!envelope.type) envelope.type = type;
    onEvent(envelope);
  };
  const open = () => {
    source = new EventSource("/api/me/events", { withCredentials: true });
    for (const type of EVENT_TYPES) source.addEventListener(type, deliver(type));
    source.addEventListener("message", deliver("message"));
    source.addEventListener("open", () => {
      failures = 0;
      onState("open");
    });
    source.addEventListener("error", () => {
      if (closed) return;
      onState("reconnecting");
      if (source.readyState === EventSource.CLOSED) {
        const wait = RETRY_MS[Math.min(failures, RETRY_MS.length - 1)];
        failures += 1;
        retry = setTimeout(open, wait);
      }
    });
  };
  open();
  return () => {
    closed = true;
    clearTimeout(retry);
    if (source) source.close();
  };
}

/** "45s", "3m 05s", "1h 02m": a wait or a countdown at a glance. */
export function fmtDuration(seconds) {
  const total = Math.max(0, Math.floor(Number(seconds) || 0));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const pad = (n) => String(n).padStart(2, "0");
  if (h > 0) return `${h}h ${pad(m)}m`;
  if (m > 0) return `${m}m ${pad(s)}s`;
  return `${s}s`;
}

/**
 * A tiny DOM builder: `el("button", {type: "button", onclick: fn}, "Accept")`. Attributes
 * starting with "on" are listeners, `class`/`className` set the class, `dataset` and `style`
 * objects are merged, `true` sets a boolean attribute, null/false/undefined are skipped.
 * Children are nodes or text (never parsed as HTML), arrays are flattened.
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      node.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "class" || key === "className") {
      node.className = value;
    } else if (key === "dataset") {
      Object.assign(node.dataset, value);
    } else if (key === "style" && typeof value === "object") {
      Object.assign(node.style, value);
    } else if (key === "value" || key === "checked" || key === "selected") {
      node[key] = value;
    } else {
      node.setAttribute(key, value === true ? "" : String(value));
    }
  }
  const append = (child) => {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) child.forEach(append);
    else node.append(child instanceof Node ? child : String(child));
  };
  children.forEach(append);
  return node;
}
