// The agent workspace shell: sign-in, presence and capacity, offers, pick-mode queues and the
// conversation list, live over the agent's event stream. The conversation itself is
// conversation.js's (openConversation); this shell opens it and hands it every event.
//
// Everything shown comes from the documented API; the event stream only says *when* to
// look again (it is a live view, the REST calls are the state), so a missed event costs a
// refetch, never a wrong screen.

import { api, ApiError, el, fmtDuration, session, signIn, signOut, subscribe } from "./api.js";

const PICK_REFRESH_MS = 5000; // pick lists: other agents take items without telling us
const REFRESH_DEBOUNCE_MS = 150; // a burst of events (offer + assign + message) = one refetch
const SESSION_CHECK_MS = 3000; // after a drop, when to ask whether the session still holds

// Events that change this agent's offers, conversations or capacity.
const WORK_EVENTS = new Set([
  "conversation.offered",
  "conversation.assigned",
  "conversation.transferred",
  "conversation.closed",
  "conversation.ended",
  "conversation.reopened",
  "conversation.waiting",
  "conversation.queued",
  "offer.declined",
  "offer.expired",
  "agent.presence-changed",
]);

const $ = (id) => document.getElementById(id);

const state = {
  me: null,
  offers: [],
  conversations: [],
  queues: [],
  pickItems: new Map(), // queue → items
  unread: new Set(), // conversation ids with customer messages not looked at
  openId: null,
  view: null,
  closeStream: null,
  timers: [],
  refreshTimer: null,
  sessionCheck: null,
  connected: false,
  busy: new Set(), // offer / item ids with a call in flight
};

// ---------------------------------------------------------------- start and sign-in

async function boot() {
  $("signin-form").addEventListener("submit", onSignIn);
  $("signout").addEventListener("click", onSignOut);
  $("supervisor-signout").addEventListener("click", onSignOut);
  $("presence").addEventListener("change", onPresence);
  let current = null;
  try {
    current = await session();
  } catch (err) {
    showSignIn(messageOf(err));
    return;
  }
  await enter(current);
}

async function enter(current) {
  $("loading").hidden = true;
  if (!current) return showSignIn();
  if (current.role === "supervisor") return showSupervisor(current);
  try {
    await startWorkspace();
  } catch (err) {
    if (isUnauthorized(err)) return showSignIn("Your session has ended. Sign in again.");
    showSignIn(messageOf(err));
  }
}

function showSignIn(message = "") {
  stopWorkspace();
  $("loading").hidden = true;
  $("workspace").hidden = true;
  $("supervisor-view").hidden = true;
  $("signin-view").hidden = false;
  $("signin-error").textContent = message;
  $("signin-token").focus();
}

function showSupervisor(current) {
  stopWorkspace();
  $("signin-view").hidden = true;
  $("workspace").hidden = true;
  $("supervisor-name").textContent = current.name || "";
  $("supervisor-view").hidden = false;
}

async function onSignIn(event) {
  event.preventDefault();
  const input = $("signin-token");
  const token = input.value.trim();
  if (!token) {
    $("signin-error").textContent = "Enter your agent token.";
    input.focus();
    return;
  }
  const button = $("signin-button");
  button.disabled = true;
  $("signin-error").textContent = "";
  try {
    const created = await signIn(token);
    input.value = ""; // the token is forgotten: the session cookie stands for it now
    await enter(created);
  } catch (err) {
    const text =
      err instanceof ApiError && (err.status === 401 || err.status === 422)
        ? "That token was not accepted."
        : messageOf(err);
    $("signin-error").textContent = text;
    input.focus();
  } finally {
    button.disabled = false;
  }
}

async function onSignOut() {
  try {
    await signOut();
  } catch {
    // Signed out locally all the same; the cookie expires on its own.
  }
  showSignIn();
}

// ---------------------------------------------------------------- the workspace

async function startWorkspace() {
  stopWorkspace();
  const [me, queues] = await Promise.all([api("GET", "/api/me"), loadQueues()]);
  state.me = me;
  state.queues = queues;
  renderMe();
  $("signin-view").hidden = true;
  $("supervisor-view").hidden = true;
  $("workspace").hidden = false;
  setConnection("connecting");
  state.closeStream = subscribe(onEvent, onStreamState);
  await refreshAll();
  state.timers.push(setInterval(tick, 1000));
  state.timers.push(setInterval(() => refreshPick().catch(report), PICK_REFRESH_MS));
}

function stopWorkspace() {
  if (state.closeStream) state.closeStream();
  state.closeStream = null;
  state.timers.forEach(clearInterval);
  state.timers = [];
  clearTimeout(state.refreshTimer);
  clearTimeout(state.sessionCheck);
  closeView();
  state.me = null;
  state.offers = [];
  state.conversations = [];
  state.pickItems = new Map();
  state.unread = new Set();
  state.connected = false;
}

async function loadQueues() {
  try {
    return await api("GET", "/api/queues");
  } catch (err) {
    if (isUnauthorized(err)) throw err;
    return []; // without the directory the page still works, without pick lists
  }
}

async function refreshAll() {
  await Promise.all([refreshMe(), refreshOffers(), refreshConversations(), refreshPick()]);
}

/** What conversation.js calls (ctx.refresh) after it changed something. */
function scheduleRefresh() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(() => refreshAll().catch(report), REFRESH_DEBOUNCE_MS);
}

async function refreshMe() {
  state.me = await api("GET", "/api/me");
  renderMe();
}

async function refreshOffers() {
  state.offers = await api("GET", "/api/me/offers");
  renderOffers();
}

async function refreshConversations() {
  state.conversations = await api("GET", "/api/me/conversations");
  const ids = new Set(state.conversations.map((c) => c.id));
  for (const id of state.unread) if (!ids.has(id)) state.unread.delete(id);
  renderConversations();
}

async function refreshPick() {
  const pickQueues = state.queues.filter((q) => q.mode === "pick" && q.member);
  const lists = await Promise.all(
    pickQueues.map((q) =>
      api("GET", `/api/queues/${encodeURIComponent(q.name)}/items`).catch((err) => {
        if (isUnauthorized(err)) throw err;
        return [];
      }),
    ),
  );
  state.pickItems = new Map(pickQueues.map((q, i) => [q.name, lists[i]]));
  renderPick();
}

// ---------------------------------------------------------------- events

function onEvent(envelope) {
  if (state.view) {
    try {
      state.view.onEvent(envelope);
    } catch (err) {
      console.error("conversation view failed on an event", err);
    }
  }
  const type = envelope.type;
  if (type === "reset") {
    refreshAll().catch(report);
  } else if (WORK_EVENTS.has(type)) {
    scheduleRefresh();
  } else if (type === "message.received") {
    const id = envelope.conversation_id;
    if (id && id !== state.openId) {
      state.unread.add(id);
      renderConversations();
    }
    if (!state.conversations.some((c) => c.id === id)) scheduleRefresh();
  }
}

function onStreamState(streamState) {
  if (streamState === "open") {
    const wasDown = !state.connected;
    state.connected = true;
    clearTimeout(state.sessionCheck);
    setConnection("live");
    // Whatever happened while the stream was down is in the lists, not in the events: the
    // replay after Last-Event-ID covers what went through the outbox, but customer messages
    // and delivery receipts are published by the webhook path directly, so the open
    // conversation reloads too.
    if (wasDown) {
      refreshAll().catch(report);
      state.view?.onEvent({ type: "reset" });
    }
  } else {
    state.connected = false;
    setConnection("reconnecting");
    // A stream that keeps failing may be a session that ended (its 401 is not visible to
    // EventSource): ask once it has had time to come back.
    clearTimeout(state.sessionCheck);
    state.sessionCheck = setTimeout(checkSession, SESSION_CHECK_MS);
  }
}

async function checkSession() {
  if (state.connected || !state.me) return;
  try {
    const current = await session();
    if (!current) showSignIn("Your session has ended. Sign in again.");
  } catch {
    // The router is away: the stream keeps trying, and so will we on its next error.
  }
}

function setConnection(value) {
  const node = $("connection");
  node.dataset.state = value;
  $("connection-text").textContent =
    value === "live" ? "live" : value === "reconnecting" ? "reconnecting…" : "connecting…";
}

// ---------------------------------------------------------------- presence and capacity

function renderMe() {
  const me = state.me;
  if (!me) return;
  $("agent-name").textContent = me.name;
  const select = $("presence");
  if (!select.dataset.pending) select.value = me.presence;
  $("capacity-value").textContent = `${me.used}/${me.capacity}`;
  $("capacity").title = `${me.used} of ${me.capacity} capacity units in use`;
}

async function onPresence(event) {
  const select = event.target;
  const wanted = select.value;
  select.dataset.pending = "1";
  select.disabled = true;
  try {
    state.me = await api("PUT", "/api/me/presence", { presence: wanted });
    clearNotice();
  } catch (err) {
    report(err);
  } finally {
    delete select.dataset.pending;
    select.disabled = false;
    renderMe();
    scheduleRefresh(); // going offline ends offers
  }
}

// ---------------------------------------------------------------- offers

function renderOffers() {
  const list = $("offers");
  const offers = state.offers;
  list.replaceChildren(...offers.map(offerItem));
  $("offers-empty").hidden = offers.length > 0;
  $("offers-count").textContent = offers.length ? `(${offers.length})` : "";
  tick();
}

// The customer's WhatsApp profile name with the number, or the number alone.
function customerOf(item) {
  const name = item.customer_name || item.profile_name;
  const number = item.customer || "Customer";
  return name ? `${name} · ${number}` : number;
}

function offerItem(offer) {
  const titleId = `offer-${offer.id}-title`;
  const busy = state.busy.has(offer.id);
  const since = offer.queued_at || offer.created_at;
  return el(
    "li",
    { class: "item offer", "aria-labelledby": titleId, dataset: { offerId: offer.id } },
    el("p", { class: "item-title", id: titleId }, customerOf(offer)),
    el(
      "p",
      { class: "item-meta" },
      el("span", {}, `Queue ${offer.queue ?? "–"}`),
      offer.priority ? el("span", {}, ` · priority ${offer.priority}`) : null,
    ),
    el(
      "p",
      { class: "item-meta" },
      "Waiting ",
      el("span", { dataset: { since } }, ""),
      " · ",
      el(
        "span",
        { class: "countdown", role: "timer", dataset: { expires: offer.expires_at } },
        "",
      ),
    ),
    el(
      "div",
      { class: "actions" },
      el(
        "button",
        {
          type: "button",
          class: "primary",
          disabled: busy,
          "aria-describedby": titleId,
          onclick: () => decideOffer(offer, "accept"),
        },
        "Accept",
      ),
      el(
        "button",
        {
          type: "button",
          disabled: busy,
          "aria-describedby": titleId,
          onclick: () => decideOffer(offer, "decline"),
        },
        "Decline",
      ),
    ),
  );
}

async function decideOffer(offer, decision) {
  if (state.busy.has(offer.id)) return;
  state.busy.add(offer.id);
  renderOffers();
  try {
    const result = await api("POST", `/api/offers/${offer.id}/${decision}`);
    clearNotice();
    state.offers = state.offers.filter((o) => o.id !== offer.id);
    if (decision === "accept" && result && result.conversation_id) {
      await refreshConversations().catch(report);
      openConversation(result.conversation_id, { focus: true });
    }
  } catch (err) {
    if (err instanceof ApiError && (err.status === 404 || err.status === 409)) {
      showNotice(`That offer is no longer available (${err.message}).`);
    } else {
      report(err);
    }
  } finally {
    state.busy.delete(offer.id);
    renderOffers();
    scheduleRefresh();
  }
}

// ---------------------------------------------------------------- pick mode

function renderPick() {
  const pane = $("pick-pane");
  const holder = $("pick-queues");
  const queues = [...state.pickItems.keys()];
  pane.hidden = queues.length === 0;
  holder.replaceChildren(
    ...queues.map((queue) => {
      const items = state.pickItems.get(queue) || [];
      const headingId = `pick-${cssId(queue)}`;
      return el(
        "section",
        { class: "pick-queue", "aria-labelledby": headingId },
        el("h3", { id: headingId }, `${queue} `, el("span", { class: "count" }, `(${items.length})`)),
        items.length
          ? el("ul", { class: "items" }, items.map(pickItem))
          : el("p", { class: "muted" }, "Nobody waiting."),
      );
    }),
  );
  tick();
}

function pickItem(item) {
  const titleId = `item-${item.id}-title`;
  const busy = state.busy.has(item.id);
  return el(
    "li",
    { class: "item", "aria-labelledby": titleId },
    el("p", { class: "item-title", id: titleId }, customerOf(item)),
    el(
      "p",
      { class: "item-meta" },
      "Waiting ",
      el("span", { dataset: { since: item.queued_at || "" } }, ""),
      item.priority ? ` · priority ${item.priority}` : "",
    ),
    el(
      "div",
      { class: "actions" },
      el(
        "button",
        {
          type: "button",
          class: "primary",
          disabled: busy || !item.fits_capacity,
          "aria-describedby": titleId,
          onclick: () => pick(item),
        },
        "Pick",
      ),
      item.fits_capacity ? null : el("span", { class: "muted" }, "No free capacity"),
    ),
  );
}

async function pick(item) {
  if (state.busy.has(item.id)) return;
  state.busy.add(item.id);
  renderPick();
  try {
    const moved = await api("POST", `/api/queue-items/${item.id}/pick`);
    clearNotice();
    await refreshConversations().catch(report);
    openConversation(moved.conversation_id, { focus: true });
  } catch (err) {
    if (err instanceof ApiError && (err.status === 404 || err.status === 409)) {
      showNotice(`Could not pick that conversation: ${err.message}.`);
    } else {
      report(err);
    }
  } finally {
    state.busy.delete(item.id);
    await refreshPick().catch(report);
    scheduleRefresh();
  }
}

// ---------------------------------------------------------------- conversation list

const STATE_NAMES = {
  active: "active",
  waiting: "waiting for the customer",
  "wrap-up": "wrap-up",
  offered: "offered",
  queued: "queued",
  closed: "closed",
};

function renderConversations() {
  const list = $("conversations");
  const conversations = state.conversations;
  list.replaceChildren(...conversations.map(conversationItem));
  $("conversations-empty").hidden = conversations.length > 0;
  $("conversations-count").textContent = conversations.length ? `(${conversations.length})` : "";
}

function conversationItem(conversation) {
  const selected = conversation.id === state.openId;
  const unread = state.unread.has(conversation.id);
  const windowText =
    conversation.window && !conversation.window.open ? " · window closed" : "";
  return el(
    "li",
    { class: "item-row" },
    el(
      "button",
      {
        type: "button",
        class: `conversation-button state-${conversation.state}`,
        "aria-current": selected ? "true" : null,
        dataset: { conversationId: conversation.id },
        onclick: () => openConversation(conversation.id, { focus: true }),
      },
      el("span", { class: "item-title" }, customerOf(conversation)),
      el(
        "span",
        { class: "item-meta" },
        el("span", { class: "state-badge" }, STATE_NAMES[conversation.state] || conversation.state),
        ` · ${conversation.queue ?? "no queue"}${windowText}`,
      ),
      unread ? el("span", { class: "unread" }, "new message") : null,
    ),
  );
}

// ---------------------------------------------------------------- the conversation view

function closeView() {
  if (state.view) {
    try {
      state.view.close();
    } catch (err) {
      console.error("conversation view failed to close", err);
    }
  }
  state.view = null;
  state.openId = null;
}

async function openConversation(conversationId, { focus = false } = {}) {
  const container = $("conversation");
  if (state.openId === conversationId && state.view) {
    if (focus) container.focus();
    return;
  }
  closeView();
  state.openId = conversationId;
  state.unread.delete(conversationId);
  renderConversations();
  container.replaceChildren(el("p", { class: "muted placeholder" }, "Opening the conversation…"));
  let module;
  try {
    module = await import("./conversation.js");
  } catch (err) {
    console.error("conversation.js could not be loaded", err);
    if (state.openId !== conversationId) return;
    container.replaceChildren(
      el(
        "div",
        { class: "placeholder" },
        el("h2", {}, "Conversation"),
        el("p", { class: "muted" }, "The conversation view is not available in this version."),
        el("p", { class: "muted" }, `Conversation ${conversationId}`),
      ),
    );
    if (focus) container.focus();
    return;
  }
  if (state.openId !== conversationId) return; // another one was chosen meanwhile
  container.replaceChildren();
  state.view = module.openConversation(container, conversationId, {
    me: state.me,
    refresh: scheduleRefresh,
  });
  if (focus) {
    container.focus();
    container.scrollIntoView({ block: "start", behavior: "smooth" });
  }
}

// ---------------------------------------------------------------- clocks, notices, helpers

function tick() {
  const now = Date.now();
  for (const node of document.querySelectorAll("[data-since]")) {
    const since = Date.parse(node.dataset.since);
    node.textContent = Number.isNaN(since) ? "–" : fmtDuration((now - since) / 1000);
  }
  let expired = false;
  for (const node of document.querySelectorAll("[data-expires]")) {
    const left = (Date.parse(node.dataset.expires) - now) / 1000;
    node.textContent = left > 0 ? `expires in ${fmtDuration(left)}` : "expired";
    node.closest(".offer")?.classList.toggle("urgent", left <= 10);
    if (left <= -1) expired = true;
  }
  if (expired) {
    // The router expires it (offer.expired follows); meanwhile it is not acceptable.
    const before = state.offers.length;
    state.offers = state.offers.filter((o) => Date.parse(o.expires_at) - now > -1000);
    if (state.offers.length !== before) renderOffers();
  }
}

function showNotice(text) {
  const notice = $("notice");
  notice.textContent = text;
  notice.hidden = false;
}

function clearNotice() {
  $("notice").hidden = true;
  $("notice").textContent = "";
}

function report(err) {
  if (isUnauthorized(err)) {
    showSignIn("Your session has ended. Sign in again.");
    return;
  }
  console.error(err);
  showNotice(messageOf(err));
}

function isUnauthorized(err) {
  return err instanceof ApiError && err.status === 401;
}

function messageOf(err) {
  if (err instanceof ApiError) return err.message || err.code;
  return String((err && err.message) || err);
}

function cssId(text) {
  return String(text).replace(/[^A-Za-z0-9_-]/g, "_");
}

boot();
