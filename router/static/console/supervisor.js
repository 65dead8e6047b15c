// The supervisor view: the queues live (waiting, longest wait, available agents, active),
// each queue's waiting count over the last hour as a small inline SVG chart, the agents, the
// pending offers and the conversations, with the admin API's supervisor actions (transfer,
// close, end an offer, set presence). Everything comes from the documented admin API
// (GET /api/admin/queues, /api/admin/queues/history, /api/admin/conversations).
//
// Live by polling, not by a stream: the router has an event stream for agents
// (/api/me/events) but none for supervisors, and the view is a handful of index-driven
// statements (omniroute.domain.queue_view), so reading it every POLL_MS costs the database
// little. Contact-center supervisor dashboards are built the same way: Dynamics 365's
// Omnichannel supervisor reports are generated from the latest data when opened and then
// re-read on a timer
// (https://learn.microsoft.com/previous-versions/dynamics365/customer-service/implement/intraday-insights-dashboard),
// and Aircall's live monitoring states its freshness as "visible in less than 5 seconds"
// (https://support.aircall.io/en-gb/articles/21683618815261). Polling stops while the tab
// is hidden and resumes at once when it is shown again.

import { ApiError, api, el, fmtDuration, session, signIn, signOut } from "./api.js";

const POLL_MS = 2500;
const HISTORY_MS = 15000;
const HISTORY_MINUTES = 60;
const CONVERSATION_LIMIT = 100;
const PRESENCES = [
  ["available", "Available"],
  ["busy", "Busy"],
  ["dnd", "Do not disturb"],
  ["away", "Away"],
  ["offline", "Offline"],
];
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

const state = {
  me: null,
  view: null, // the last GET /api/admin/queues
  skewMs: 0, // the browser's clock minus the router's
  agents: new Map(), // id → agent (with the queues it serves)
  history: null,
  historyAt: 0,
  timer: null,
  polling: false,
  pending: new Set(), // keys of actions in flight (their controls stay disabled)
};

// --- small helpers ------------------------------------------------------------------------

/** An Idempotency-Key. crypto.randomUUID() exists only in secure contexts (HTTPS or
 * localhost; https://developer.mozilla.org/docs/Web/API/Crypto/randomUUID); a router reached
 * over plain HTTP on a LAN still gets a v4 UUID from getRandomValues, which has no such
 * restriction. */
function newKey() {
  if (globalThis.crypto && typeof globalThis.crypto.randomUUID === "function") {
    return globalThis.crypto.randomUUID();
  }
  const b = globalThis.crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  for (const child of children) node.append(child);
  return node;
}

function show(view) {
  for (const id of ["loading", "signin-view", "agent-view", "dashboard"]) $(id).hidden = id !== view;
}

function notify(message) {
  const notice = $("notice");
  notice.textContent = message;
  notice.hidden = !message;
}

function describe(err) {
  if (err instanceof ApiError) {
    const fields = err.details && Array.isArray(err.details.fields) ? err.details.fields : [];
    const extra = fields.map((f) => `${f.field}: ${f.problem}`).join("; ");
    return extra ? `${err.message} (${extra})` : err.message;
  }
  return String(err && err.message ? err.message : err);
}

function agentName(id) {
  if (!id) return "–";
  const agent = state.agents.get(id);
  return agent ? agent.name : `agent ${id.slice(0, 8)}`;
}

/** Replace a cell's text only when it changed (screen readers and selection stay put). */
function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

/** Keep a tbody's rows in the order of `items`, making a row for a new key with `make` and
 * updating each with `update`; rows of keys gone are removed. */
function syncRows(tbody, items, key, make, update) {
  const existing = new Map([...tbody.rows].map((row) => [row.dataset.key, row]));
  let previous = null;
  for (const item of items) {
    const k = key(item);
    let row = existing.get(k);
    if (!row) {
      row = make(item);
      row.dataset.key = k;
    }
    existing.delete(k);
    update(row, item);
    const expected = previous ? previous.nextSibling : tbody.firstChild;
    if (row !== expected) tbody.insertBefore(row, expected);
    previous = row;
  }
  for (const row of existing.values()) row.remove();
}

// --- signing in and out -------------------------------------------------------------------

async function start() {
  let current = null;
  try {
    current = await session();
  } catch (err) {
    $("signin-error").textContent = describe(err);
  }
  enter(current);
}

function enter(current) {
  state.me = current;
  if (!current) {
    stopPolling();
    show("signin-view");
    $("signin-token").focus();
    return;
  }
  if (current.role !== "supervisor") {
    stopPolling();
    show("agent-view");
    return;
  }
  $("supervisor-name").textContent = current.name || "supervisor";
  show("dashboard");
  startPolling();
}

$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("signin-token").value.trim();
  const name = $("signin-name").value.trim();
  $("signin-error").textContent = "";
  if (!token) {
    $("signin-error").textContent = "Enter the admin token.";
    $("signin-token").focus();
    return;
  }
  $("signin-button").disabled = true;
  try {
    const created = await signIn(token, name || undefined);
    $("signin-token").value = ""; // the token is not kept anywhere once the session exists
    enter(created);
  } catch (err) {
    $("signin-error").textContent =
      err instanceof ApiError && err.status === 401 ? "That token is not valid." : describe(err);
    $("signin-token").select();
  } finally {
    $("signin-button").disabled = false;
  }
});

async function leave() {
  stopPolling();
  try {
    await signOut();
  } catch (err) {
    notify(describe(err));
  }
  enter(null);
}
$("signout").addEventListener("click", leave);
$("agent-signout").addEventListener("click", leave);

// --- polling ------------------------------------------------------------------------------

function startPolling() {
  if (state.polling) return;
  state.polling = true;
  state.historyAt = 0;
  tick();
}

function stopPolling() {
  state.polling = false;
  clearTimeout(state.timer);
  state.timer = null;
}

function freshness(kind, text) {
  $("freshness").dataset.state = kind;
  setText($("freshness-text"), text);
}

/** One refresh, then the next is scheduled (never two in flight: a slow answer delays the
 * next read instead of piling them up). */
async function tick() {
  clearTimeout(state.timer);
  if (!state.polling) return;
  try {
    await refresh();
    freshness("live", "live");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      stopPolling();
      enter(null);
      $("signin-error").textContent = "Your session has ended. Sign in again.";
      return;
    }
    freshness("reconnecting", `retrying: ${describe(err)}`);
  }
  if (state.polling && !document.hidden) state.timer = setTimeout(tick, POLL_MS);
}

document.addEventListener("visibilitychange", () => {
  if (!state.polling) return;
  if (document.hidden) clearTimeout(state.timer);
  else tick();
});

async function refresh() {
  const stateFilter = $("state-filter").value;
  const wantHistory = Date.now() - state.historyAt >= HISTORY_MS;
  const [view, conversations, history] = await Promise.all([
    api("GET", "/api/admin/queues"),
    api(
      "GET",
      `/api/admin/conversations?state=${encodeURIComponent(stateFilter)}&limit=${CONVERSATION_LIMIT}`,
    ),
    wantHistory ? api("GET", `/api/admin/queues/history?minutes=${HISTORY_MINUTES}`) : null,
  ]);
  state.view = view;
  state.skewMs = Date.now() - Date.parse(view.at);
  if (history) {
    state.history = history;
    state.historyAt = Date.now();
  }
  collectAgents(view);
  renderQueues(view);
  renderCharts();
  renderAgents();
  renderOffers(view);
  renderConversations(stateFilter === $("state-filter").value ? conversations : null);
}

$("state-filter").addEventListener("change", () => {
  $("conversations-body").replaceChildren();
  tick();
});

// --- the queues ---------------------------------------------------------------------------

function collectAgents(view) {
  const agents = new Map();
  for (const queue of view.queues) {
    for (const agent of queue.agents) {
      const known = agents.get(agent.id);
      if (known) known.queues.push(queue.queue);
      else agents.set(agent.id, { ...agent, queues: [queue.queue] });
    }
  }
  state.agents = agents;
}

function renderQueues(view) {
  syncRows(
    $("queues-body"),
    view.queues,
    (q) => q.queue,
    () => el("tr", {}, el("th", { scope: "row" }), ...[1, 2, 3, 4].map(() => el("td", { class: "num" }))),
    (row, q) => {
      const [name, waiting, longest, available, active] = row.cells;
      setText(name, q.queue);
      setText(waiting, String(q.waiting));
      setText(longest, q.longest_wait_seconds === null ? "–" : fmtDuration(q.longest_wait_seconds));
      setText(available, String(q.available_agents));
      setText(active, String(q.active));
      row.classList.toggle("attention", q.waiting > 0 && q.available_agents === 0);
    },
  );
}

// --- the chart: one small line chart per queue, drawn here (no library) --------------------

const CHART = { width: 320, height: 96, left: 28, right: 8, top: 8, bottom: 20 };

function seriesFor(queue) {
  if (!state.history) return null;
  const found = state.history.queues.find((s) => s.queue === queue.queue);
  if (!found) return null;
  const points = found.points.map((p) => p.waiting);
  // The history is re-read every HISTORY_MS; its last point is "now": keep it live.
  if (points.length) points[points.length - 1] = queue.waiting;
  return points;
}

function chartFor(queue, points) {
  const { width, height, left, right, top, bottom } = CHART;
  const most = Math.max(1, ...points);
  const plotW = width - left - right;
  const plotH = height - top - bottom;
  const x = (i) => left + (points.length > 1 ? (plotW * i) / (points.length - 1) : plotW);
  const y = (v) => top + plotH - (plotH * v) / most;
  const line = points.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const area = `${x(0).toFixed(1)},${y(0).toFixed(1)} ${line} ${x(points.length - 1).toFixed(1)},${y(0).toFixed(1)}`;
  const slug = queue.queue.replace(/[^A-Za-z0-9_-]/g, "_");
  const titleId = `chart-title-${slug}`;
  const descId = `chart-desc-${slug}`;
  const minutes = points.length;
  const peak = Math.max(0, ...points);
  const peakAgo = minutes - 1 - points.lastIndexOf(peak);
  const summary =
    `${queue.waiting} waiting now; at most ${peak} in the last ${minutes} minutes` +
    (peak > 0 ? ` (${peakAgo === 0 ? "now" : `${peakAgo} min ago`})` : "") +
    `; ${points[0]} waiting ${minutes} minutes ago.`;
  return svg(
    "svg",
    {
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-labelledby": `${titleId} ${descId}`,
      class: "chart",
    },
    svg("title", { id: titleId }, `Waiting in ${queue.queue}, last ${minutes} minutes`),
    svg("desc", { id: descId }, summary),
    svg("line", { x1: left, y1: y(0), x2: width - right, y2: y(0), class: "axis" }),
    svg("line", { x1: left, y1: y(most), x2: width - right, y2: y(most), class: "grid-line" }),
    svg("text", { x: left - 4, y: y(most) + 4, class: "tick", "text-anchor": "end" }, String(most)),
    svg("text", { x: left - 4, y: y(0) + 4, class: "tick", "text-anchor": "end" }, "0"),
    svg("text", { x: left, y: height - 4, class: "tick" }, `${minutes} min ago`),
    svg("text", { x: width - right, y: height - 4, class: "tick", "text-anchor": "end" }, "now"),
    svg("polygon", { points: area, class: "area" }),
    svg("polyline", { points: line, class: "line" }),
  );
}

function renderCharts() {
  const charts = $("charts");
  if (!state.view) return;
  const figures = state.view.queues.map((queue) => {
    const points = seriesFor(queue);
    return el(
      "figure",
      { class: "chart-figure" },
      el("figcaption", {}, queue.queue, " ", el("span", { class: "muted" }, `${queue.waiting} waiting`)),
      points ? chartFor(queue, points) : el("p", { class: "muted" }, "No history yet."),
    );
  });
  charts.replaceChildren(...figures);
}

// --- agents and their presence ------------------------------------------------------------

function renderAgents() {
  const agents = [...state.agents.values()].sort((a, b) => a.name.localeCompare(b.name));
  $("agents-empty").hidden = agents.length > 0;
  syncRows(
    $("agents-body"),
    agents,
    (a) => a.id,
    (a) => {
      const nameId = `agent-name-${a.id}`;
      const select = el(
        "select",
        { "aria-label": "Presence", "aria-describedby": nameId, class: "presence-select" },
        PRESENCES.map(([value, label]) => el("option", { value }, label)),
      );
      select.addEventListener("change", () => changePresence(a.id, select));
      return el(
        "tr",
        {},
        el("th", { scope: "row", id: nameId }),
        el("td", {}, select),
        el("td", { class: "num" }),
        el("td", { class: "num" }),
        el("td", {}),
      );
    },
    (row, a) => {
      const [name, presence, capacity, active, queues] = row.cells;
      setText(name, a.name);
      const select = presence.firstChild;
      // Not while the supervisor is choosing, nor while a change is on its way.
      if (document.activeElement !== select && !state.pending.has(`presence:${a.id}`)) {
        select.value = a.presence;
      }
      setText(capacity, `${a.used}/${a.capacity}`);
      setText(active, String(a.active_conversations));
      setText(queues, a.queues.join(", "));
      row.classList.toggle("can-take", a.available);
    },
  );
}

async function changePresence(agentId, select) {
  const key = `presence:${agentId}`;
  state.pending.add(key);
  select.disabled = true;
  try {
    await api(
      "PUT",
      `/api/admin/agents/${agentId}/presence`,
      { presence: select.value },
      { idempotencyKey: newKey() },
    );
    notify("");
  } catch (err) {
    notify(`${agentName(agentId)}'s presence was not changed: ${describe(err)}`);
    const agent = state.agents.get(agentId);
    if (agent) select.value = agent.presence;
  } finally {
    state.pending.delete(key);
    select.disabled = false;
  }
  tick();
}

// --- pending offers -----------------------------------------------------------------------

function pendingOffers(view) {
  return view.queues.flatMap((q) => q.offers.map((o) => ({ ...o, queue: q.queue })));
}

function renderOffers(view) {
  const offers = pendingOffers(view);
  $("offers-empty").hidden = offers.length > 0;
  $("offers-table").parentElement.hidden = offers.length === 0;
  const now = Date.now() - state.skewMs;
  syncRows(
    $("offers-body"),
    offers,
    (o) => o.id,
    (o) => {
      const button = el("button", { type: "button" }, "End offer");
      button.addEventListener("click", () => endOffer(o.id, button));
      return el("tr", {}, el("td"), el("td"), el("td", { class: "num" }), el("td", {}, button));
    },
    (row, o) => {
      const [conversation, agent, expires] = row.cells;
      setText(conversation, `${o.customer} · ${o.queue}`);
      setText(agent, agentName(o.agent_id));
      setText(expires, fmtDuration((Date.parse(o.expires_at) - now) / 1000));
    },
  );
}

async function endOffer(offerId, button) {
  await act(button, "The offer was not ended", () =>
    api("POST", `/api/admin/offers/${offerId}/end`, undefined, { idempotencyKey: newKey() }),
  );
}

// --- conversations and their actions ------------------------------------------------------

function transferOptions(conversation) {
  const queues = (state.view ? state.view.queues : [])
    .map((q) => q.queue)
    .filter((q) => q !== conversation.queue);
  const agents = [...state.agents.values()].filter(
    (a) => a.available && a.id !== conversation.agent_id && a.queues.includes(conversation.queue),
  );
  return [
    el("option", { value: "" }, "Choose…"),
    queues.length
      ? el("optgroup", { label: "Queues" }, queues.map((q) => el("option", { value: `queue:${q}` }, q)))
      : null,
    agents.length
      ? el(
          "optgroup",
          { label: "Available agents" },
          agents.map((a) => el("option", { value: `agent:${a.id}` }, a.name)),
        )
      : null,
  ];
}

function renderConversations(conversations) {
  if (!conversations) return;
  const offers = new Map(pendingOffers(state.view).map((o) => [o.conversation_id, o]));
  $("conversations-empty").hidden = conversations.length > 0;
  $("conversations-table").parentElement.hidden = conversations.length === 0;
  syncRows(
    $("conversations-body"),
    conversations,
    (c) => c.id,
    (c) => {
      const customerId = `conversation-${c.id}`;
      const target = el("select", { "aria-label": "Transfer to", "aria-describedby": customerId });
      const transfer = el("button", { type: "button", "aria-describedby": customerId }, "Transfer");
      const close = el("button", { type: "button", "aria-describedby": customerId }, "Close");
      const end = el("button", { type: "button", "aria-describedby": customerId, hidden: true }, "End offer");
      transfer.addEventListener("click", () => transferConversation(c.id, target, transfer));
      close.addEventListener("click", () => closeConversation(c.id, close));
      end.addEventListener("click", () => {
        const offer = pendingOffers(state.view).find((o) => o.conversation_id === c.id);
        if (offer) endOffer(offer.id, end);
      });
      return el(
        "tr",
        {},
        el("th", { scope: "row", id: customerId }),
        el("td"),
        el("td"),
        el("td", { class: "num" }),
        el("td"),
        el("td", {}, el("div", { class: "row-actions" }, target, transfer, close, end)),
      );
    },
    (row, c) => {
      const [customer, queue, stateCell, wait, agent, actions] = row.cells;
      setText(customer, c.customer);
      setText(queue, c.queue || "–");
      setText(stateCell, c.state);
      setText(wait, c.wait_seconds === null ? "–" : fmtDuration(c.wait_seconds));
      setText(agent, agentName(c.agent_id));
      const [target, , , end] = actions.firstChild.children;
      if (document.activeElement !== target) {
        const chosen = target.value;
        target.replaceChildren(...transferOptions(c).filter(Boolean));
        if ([...target.options].some((o) => o.value === chosen)) target.value = chosen;
      }
      end.hidden = !offers.has(c.id);
    },
  );
}

/** Run one supervisor action from `control`: disabled while it runs, its refusal shown in
 * the alert region, the view re-read after it. */
async function act(control, failure, call) {
  control.disabled = true;
  try {
    await call();
    notify("");
  } catch (err) {
    notify(`${failure}: ${describe(err)}`);
  } finally {
    control.disabled = false;
  }
  tick();
}

async function transferConversation(conversationId, target, button) {
  const [kind, ...rest] = target.value.split(":");
  const to = rest.join(":");
  if (!kind || !to) {
    notify("Choose a queue or an agent to transfer to.");
    target.focus();
    return;
  }
  const body = kind === "queue" ? { queue: to } : { agent_id: to };
  await act(button, "The conversation was not transferred", () =>
    api("POST", `/api/admin/conversations/${conversationId}/transfer`, body, {
      idempotencyKey: newKey(),
    }),
  );
}

async function closeConversation(conversationId, button) {
  await act(button, "The conversation was not closed", () =>
    api("POST", `/api/admin/conversations/${conversationId}/close`, {}, { idempotencyKey: newKey() }),
  );
}

start();
