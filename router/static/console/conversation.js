// One conversation, as its agent works it: who the customer is and why the conversation is
// here, the thread with each message's delivery status, the composer (free text inside
// WhatsApp's 24-hour window, an approved template outside it), transfer and end.
//
// The REST calls are the state; events from the shell's stream only say when to look again
// or move a delivery status forward. Messages are kept by id, so a refetch after an event
// never shows one twice, and status lines are updated in place: a live region announces a
// change of its content, not a node that replaces it ("works as long as you add the attribute
// before the changes occur": https://developer.mozilla.org/en-US/docs/Web/Accessibility/ARIA/ARIA_Live_Regions;
// role=status is polite and atomic: .../ARIA/Roles/status_role).

import { api, ApiError, el, fmtDuration } from "./api.js";

// Shown inline: the raster types the media endpoint serves inline (router/messages_api.py);
// anything else, SVG included, is a download there and here.
const INLINE_IMAGES = new Set(["image/jpeg", "image/png", "image/gif", "image/webp"]);
const REFETCH_DEBOUNCE_MS = 150; // a burst of events (message + status) = one refetch
const TICK_MS = 1000; // window and wrap-up countdowns
const WRAP_UP_GRACE_MS = 3000; // after wrap-up ends, when to ask whether it closed

// Delivery statuses in the order a message goes through them; mirrors consumers/delivery.py
// (statuses only move forward; a failure after delivered/read is late news and ignored).
const RANK = {
  requested: 0,
  accepted: 0,
  scheduled: 0,
  queued: 1,
  sending: 2,
  retrying: 2,
  sent: 3,
  delivered: 4,
  read: 5,
};
const TERMINAL = new Set(["failed", "undelivered", "canceled", "rejected", "skipped"]);
const REACHED = new Set(["delivered", "read"]);
// What the agent reads for each stored status.
const STATUS_TEXT = {
  requested: "queued",
  accepted: "queued",
  scheduled: "queued",
  queued: "queued",
  sending: "sending",
  retrying: "retrying",
  sent: "sent",
  delivered: "delivered",
  read: "read",
  failed: "failed",
  undelivered: "failed",
  canceled: "canceled",
  rejected: "rejected",
  skipped: "not sent",
};
const STEP_EVENTS = new Set([
  "message.sent",
  "message.delivered",
  "message.read",
  "message.failed",
  "message.rejected",
]);
const CONVERSATION_EVENTS = new Set([
  "conversation.assigned",
  "conversation.transferred",
  "conversation.ended",
  "conversation.closed",
  "conversation.reopened",
  "conversation.waiting",
  "conversation.queued",
  "conversation.offered",
  "supervisor.acted",
]);

/** The delivery status after `incoming`, given `current` (forward only). */
export function advance(current, incoming) {
  if (TERMINAL.has(current)) return current;
  if (TERMINAL.has(incoming)) return REACHED.has(current) ? current : incoming;
  if (!(incoming in RANK)) return current;
  return RANK[incoming] > (RANK[current] ?? -1) ? incoming : current;
}

// crypto.randomUUID exists in secure contexts only (HTTPS, or localhost); a console served
// over plain HTTP on a LAN address still needs a key, and getRandomValues is available there
// (https://developer.mozilla.org/en-US/docs/Web/API/Crypto/randomUUID).
function newKey() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

const clock = (iso) =>
  new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
const dateTime = (iso) =>
  new Date(iso).toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
const safeUrl = (url) => {
  try {
    const parsed = new URL(url, location.href);
    return parsed.protocol === "https:" || parsed.protocol === "http:" ? parsed.href : null;
  } catch {
    return null;
  }
};

function errorText(err) {
  if (!(err instanceof ApiError)) return `Something went wrong: ${err?.message || err}`;
  const parts = [err.message || err.code];
  const details = err.details || {};
  if (err.code === "window_closed" && details.templates?.length) {
    parts.push(`Templates you can send: ${details.templates.join(", ")}.`);
  }
  if (details.languages?.length) parts.push(`Languages: ${details.languages.join(", ")}.`);
  if (details.fields) {
    for (const [field, problem] of Object.entries(details.fields)) parts.push(`${field}: ${problem}`);
  }
  const sentence = (text) => (/[.!?]$/.test(text) ? text : `${text}.`);
  return `${parts.map(sentence).join(" ")} (${err.code})`;
}

let instances = 0;

/**
 * Opens conversation `conversationId` in `container`. `ctx.me` is the agent (GET /api/me),
 * `ctx.refresh()` asks the shell to reload its lists. Answers `{onEvent(envelope), close()}`.
 */
export function openConversation(container, conversationId, ctx) {
  const view = new ConversationView(container, conversationId, ctx || {});
  view.start();
  return { onEvent: (envelope) => view.onEvent(envelope), close: () => view.close() };
}

class ConversationView {
  constructor(container, id, ctx) {
    this.container = container;
    this.id = id;
    this.ctx = ctx;
    this.prefix = `cv${++instances}`;
    this.base = `/api/conversations/${encodeURIComponent(id)}`;
    this.detail = null;
    this.messages = new Map(); // id → {message, node, statusWord, statusReason, history}
    this.closed = false;
    this.gone = false; // the conversation is no longer this agent's
    this.composerMode = null;
    this.templatesShown = null;
    this.sendKey = null; // {payload, key}: a retry of the same send reuses its key
    this.sending = false;
    this.refetchTimer = null;
    this.detailTimer = null;
    this.ticker = null;
    this.wrapUpCheck = null;
    this.build();
  }

  // ------------------------------------------------------------------ skeleton

  build() {
    const p = this.prefix;
    this.title = el("h2", { id: `${p}-title`, class: "cv-title" }, "Conversation");
    this.subtitle = el("p", { class: "cv-subtitle" });
    this.stateLine = el("p", { class: "cv-state", "aria-live": "polite" });
    this.windowLine = el("p", { class: "cv-window" });
    // A countdown is a timer: its ticks are not announced (implicit aria-live off;
    // https://developer.mozilla.org/en-US/docs/Web/Accessibility/ARIA/Roles/timer_role).
    this.wrapUpLine = el("p", { class: "cv-wrapup", role: "timer", hidden: true });
    this.transferButton = el(
      "button",
      { type: "button", class: "cv-transfer", onclick: () => this.openTransfer() },
      "Transfer",
    );
    this.endButton = el(
      "button",
      { type: "button", class: "cv-end danger", onclick: () => this.end() },
      "End conversation",
    );
    this.headerError = el("p", { class: "cv-error", role: "alert" });
    const header = el(
      "header",
      { class: "cv-header" },
      el("div", { class: "cv-who" }, this.title, this.subtitle, this.stateLine),
      el("div", { class: "cv-actions" }, this.transferButton, this.endButton),
      el("div", { class: "cv-clocks" }, this.windowLine, this.wrapUpLine),
      this.headerError,
    );

    this.sideDetails = el("dl", { class: "cv-facts" });
    this.sideVariables = el("div", { class: "cv-variables" });
    this.side = el(
      "aside",
      { class: "cv-side", "aria-labelledby": `${p}-side` },
      el("h3", { id: `${p}-side` }, "Classification"),
      this.sideDetails,
      el("h3", {}, "Context variables"),
      this.sideVariables,
    );

    this.threadList = el("ol", { class: "cv-thread-list" });
    this.threadEmpty = el("p", { class: "muted cv-thread-empty" }, "Loading messages…");
    // A chat transcript is a log: new entries are announced politely
    // (https://developer.mozilla.org/en-US/docs/Web/Accessibility/ARIA/Roles/log_role).
    this.thread = el(
      "div",
      { class: "cv-thread", role: "log", "aria-label": "Messages", tabindex: "0" },
      this.threadEmpty,
      this.threadList,
    );
    this.composer = el("div", { class: "cv-composer" });
    this.composerError = el("p", { class: "cv-error", role: "alert" });
    this.root = el(
      "article",
      { class: "cv", "aria-labelledby": `${p}-title` },
      header,
      el(
        "div",
        { class: "cv-body" },
        el("div", { class: "cv-main" }, this.thread, this.composerError, this.composer),
        this.side,
      ),
    );
    this.container.replaceChildren(this.root);
  }

  async start() {
    this.ticker = setInterval(() => this.tick(), TICK_MS);
    await Promise.all([this.loadDetail(), this.loadMessages()]);
  }

  close() {
    this.closed = true;
    clearInterval(this.ticker);
    clearTimeout(this.refetchTimer);
    clearTimeout(this.detailTimer);
    clearTimeout(this.wrapUpCheck);
    this.transferDialog?.close();
  }

  // ------------------------------------------------------------------ events

  onEvent(envelope) {
    if (this.closed || !envelope) return;
    const type = envelope.type;
    const data = envelope.data || {};
    if (type === "reset") {
      this.scheduleDetail();
      this.scheduleRefetch();
      return;
    }
    const ours =
      envelope.conversation_id === this.id ||
      (type === "message.received" &&
        this.detail &&
        data.customer === this.detail.customer &&
        data.business_number === this.detail.business_number);
    if (type === "message.status" && data.message_sid) {
      // Twilio's raw callback names the message by its sid only.
      const entry = [...this.messages.values()].find((e) => e.message.twilio_sid === data.message_sid);
      if (entry) this.applyStatus(entry, data.status, data);
      return;
    }
    if (!ours) return;
    if (type === "message.received") {
      this.scheduleRefetch();
      this.scheduleDetail(); // the window reopened
    } else if (type === "message.send-requested") {
      this.scheduleRefetch();
    } else if (STEP_EVENTS.has(type)) {
      const entry = this.messages.get(data.message_id);
      const status = type === "message.rejected" ? "rejected" : data.status || type.split(".")[1];
      if (entry) this.applyStatus(entry, status, data);
      else this.scheduleRefetch();
      if (data.error_code === "63016" || data.reason === "window_closed") this.scheduleDetail();
    } else if (CONVERSATION_EVENTS.has(type)) {
      this.scheduleDetail();
    }
  }

  scheduleRefetch() {
    clearTimeout(this.refetchTimer);
    this.refetchTimer = setTimeout(() => this.loadMessages(), REFETCH_DEBOUNCE_MS);
  }

  scheduleDetail() {
    clearTimeout(this.detailTimer);
    this.detailTimer = setTimeout(() => this.loadDetail(), REFETCH_DEBOUNCE_MS);
  }

  // ------------------------------------------------------------------ detail

  async loadDetail() {
    if (this.gone) return;
    let detail;
    try {
      detail = await api("GET", this.base);
    } catch (err) {
      if (this.closed) return;
      if (err instanceof ApiError && err.status === 404) {
        this.showGone("This conversation is closed or no longer yours.");
        return;
      }
      this.headerError.textContent = errorText(err);
      return;
    }
    if (this.closed) return;
    this.detail = detail;
    this.renderDetail();
  }

  renderDetail() {
    const d = this.detail;
    this.title.textContent = d.profile_name || d.customer;
    this.subtitle.replaceChildren(
      d.profile_name ? el("span", { class: "cv-number" }, d.customer) : null,
      el("span", {}, "Queue: ", el("strong", {}, d.queue || "none")),
    );
    this.stateLine.replaceChildren("State: ", el("strong", {}, d.state));
    this.wrapUpLine.hidden = !(d.state === "wrap-up" && d.wrap_up_until);
    // Ended: the conversation is the agent's until wrap-up ends, but no longer to move.
    this.transferButton.disabled = d.state === "wrap-up";
    this.renderSide();
    this.renderComposer();
    this.tick();
  }

  renderSide() {
    const d = this.detail;
    const facts = [];
    const fact = (term, ...value) => facts.push(el("dt", {}, term), el("dd", {}, ...value));
    fact("Queue", d.queue || "none");
    const skills = Object.entries(d.skills || {});
    fact("Skills", skills.length ? skills.map(([s, level]) => `${s} ${level}`).join(", ") : "none");
    fact("Priority", String(d.priority));
    fact("Severity", d.severity);
    fact("Language", d.language || "not set");
    fact("Workstream", d.workstream);
    const trace = d.classification;
    if (trace) {
      fact(
        "Routed by",
        trace.route ? `${trace.route.rule} (${trace.route.why})` : "the workstream's fallback queue",
      );
      fact(
        "Matched rules",
        trace.matched.length
          ? el(
              "ul",
              { class: "cv-rules" },
              trace.matched.map((m) => el("li", {}, `${m.ruleset} / ${m.rule}: ${m.why}`)),
            )
          : "none",
      );
    }
    this.sideDetails.replaceChildren(...facts);
    const variables = Object.entries(d.variables || {});
    this.sideVariables.replaceChildren(
      variables.length
        ? el(
            "dl",
            { class: "cv-facts" },
            variables.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]),
          )
        : el("p", { class: "muted" }, "None"),
    );
  }

  // ------------------------------------------------------------------ clocks

  tick() {
    if (!this.detail || this.gone) return;
    const now = Date.now();
    const win = this.detail.window;
    const closesAt = Date.parse(win.closes_at);
    const open = win.open && closesAt > now;
    if (open) {
      this.windowLine.replaceChildren(
        "24-hour window open: closes in ",
        el("strong", {}, fmtDuration((closesAt - now) / 1000)),
        ` (at ${clock(win.closes_at)})`,
      );
    } else {
      this.windowLine.replaceChildren(`24-hour window closed at ${dateTime(win.closes_at)}`);
    }
    this.windowLine.classList.toggle("cv-window--closed", !open);
    if (this.composerMode && this.composerMode !== this.modeOf()) this.renderComposer();
    const d = this.detail;
    if (d.state === "wrap-up" && d.wrap_up_until) {
      const left = (Date.parse(d.wrap_up_until) - now) / 1000;
      this.wrapUpLine.textContent =
        left > 0 ? `Wrap-up ends in ${fmtDuration(left)}` : "Wrap-up has ended";
      if (left <= 0 && !this.wrapUpCheck) {
        this.wrapUpCheck = setTimeout(() => {
          this.wrapUpCheck = null;
          this.loadDetail();
        }, WRAP_UP_GRACE_MS);
      }
    }
  }

  // ------------------------------------------------------------------ thread

  async loadMessages() {
    if (this.gone) return;
    let messages;
    try {
      messages = await api("GET", `${this.base}/messages`);
    } catch (err) {
      if (this.closed) return;
      if (err instanceof ApiError && err.status === 404) {
        this.showGone("This conversation is closed or no longer yours.");
        return;
      }
      this.threadEmpty.textContent = errorText(err);
      return;
    }
    if (this.closed) return;
    const atBottom =
      this.thread.scrollHeight - this.thread.scrollTop - this.thread.clientHeight < 40;
    let added = false;
    for (const message of messages) {
      const known = this.messages.get(message.id);
      if (known) {
        // The stored status is the truth; a local step ahead of it (from an event) stays.
        this.applyStatus(known, message.status, message, message.status_history);
      } else {
        this.messages.set(message.id, this.renderMessage(message));
        added = true;
      }
    }
    if (added) this.placeMessages();
    this.threadEmpty.textContent = this.messages.size ? "" : "No messages yet.";
    this.threadEmpty.hidden = this.messages.size > 0;
    if (added && atBottom) this.thread.scrollTop = this.thread.scrollHeight;
  }

  /** Keeps the list in the router's order (received_at, then id). */
  placeMessages() {
    const ordered = [...this.messages.values()].sort((a, b) => {
      const at = a.message.received_at.localeCompare(b.message.received_at);
      return at || a.message.id.localeCompare(b.message.id);
    });
    ordered.forEach((entry, index) => {
      if (this.threadList.children[index] !== entry.node) {
        this.threadList.insertBefore(entry.node, this.threadList.children[index] || null);
      }
    });
  }

  renderMessage(message) {
    const mine = this.ctx.me && message.agent_id === this.ctx.me.id;
    const who = {
      customer: "Customer",
      agent: mine ? "You" : "Another agent",
      automated: "Automated message",
      bot: "Bot",
    }[message.sender] || message.direction;
    const meta = el(
      "p",
      { class: "cv-msg-meta" },
      el("span", { class: "cv-msg-who" }, who),
      message.template ? el("span", { class: "cv-badge" }, `template ${message.template}`) : null,
      el("time", { datetime: message.received_at }, clock(message.received_at)),
    );
    const body = message.body ? el("p", { class: "cv-msg-body" }, message.body) : null;
    const node = el(
      "li",
      { class: `cv-msg cv-msg--${message.sender}`, "data-message-id": message.id },
      meta,
      body,
      this.renderMedia(message),
    );
    const entry = { message: { ...message }, node };
    if (message.direction === "outbound") {
      entry.statusWord = el("span", { class: "cv-status-word" });
      entry.statusReason = el("span", { class: "cv-status-reason" });
      entry.statusLine = el(
        "p",
        { class: "cv-msg-status", role: "status", "aria-live": "polite" },
        el("span", { class: "visually-hidden cv-sr-only" }, "Delivery status: "),
        entry.statusWord,
        entry.statusReason,
      );
      entry.history = el("ol", { class: "cv-history" });
      entry.historyBox = el(
        "details",
        { class: "cv-history-box", hidden: true },
        el("summary", {}, "Status history"),
        entry.history,
      );
      node.append(entry.statusLine, entry.historyBox);
      this.showStatus(entry);
    }
    return entry;
  }

  renderMedia(message) {
    const items = [];
    (message.media || []).forEach((media, n) => {
      const type = media.content_type || "";
      if (message.direction === "inbound") {
        const href = `${this.base}/messages/${encodeURIComponent(message.id)}/media/${n}`;
        if (INLINE_IMAGES.has(type.split(";")[0].trim().toLowerCase())) {
          items.push(
            el(
              "a",
              { href, target: "_blank", rel: "noopener", class: "cv-media-image" },
              el("img", { src: href, alt: `Image ${n + 1} sent by the customer`, loading: "lazy" }),
            ),
          );
        } else {
          items.push(
            el(
              "a",
              { href, download: "", class: "cv-media-file" },
              `Download attachment ${n + 1}${type ? ` (${type})` : ""}`,
            ),
          );
        }
      } else {
        const href = safeUrl(media.url);
        items.push(
          href
            ? el("a", { href, target: "_blank", rel: "noopener noreferrer" }, `Attachment ${n + 1}`)
            : el("span", {}, `Attachment ${n + 1}`),
        );
      }
    });
    if (message.media_hidden) {
      items.push(
        el(
          "span",
          { class: "muted" },
          `${message.media_hidden} attachment(s) not shown: this workstream does not take attachments from customers`,
        ),
      );
    }
    return items.length ? el("p", { class: "cv-media" }, ...items) : null;
  }

  applyStatus(entry, incoming, data = {}, history = null) {
    if (!entry.statusWord || !incoming) return;
    const next = advance(entry.message.status, incoming);
    const changed = next !== entry.message.status;
    if (changed) {
      entry.message.status = next;
      if (TERMINAL.has(next)) {
        entry.message.error_code = data.error_code ?? data.reason ?? entry.message.error_code;
        entry.message.error_message =
          data.error_message ?? data.message ?? entry.message.error_message;
      }
    }
    if (history) entry.message.status_history = history;
    if (changed || history) this.showStatus(entry);
  }

  showStatus(entry) {
    const m = entry.message;
    const word = STATUS_TEXT[m.status] || m.status;
    if (entry.statusWord.textContent !== word) entry.statusWord.textContent = word;
    let reason = "";
    if (TERMINAL.has(m.status)) {
      reason = m.error_message || m.error_code || "";
      if (m.error_message && m.error_code) reason += ` (code ${m.error_code})`;
    }
    const reasonText = reason ? `: ${reason}` : "";
    if (entry.statusReason.textContent !== reasonText) entry.statusReason.textContent = reasonText;
    entry.node.classList.toggle("cv-msg--failed", TERMINAL.has(m.status));
    const history = m.status_history || [];
    entry.historyBox.hidden = history.length === 0;
    entry.history.replaceChildren(
      ...history.map((h) =>
        el(
          "li",
          {},
          `${h.status}${h.error_code ? ` (error ${h.error_code})` : ""} at `,
          el("time", { datetime: h.received_at }, clock(h.received_at)),
        ),
      ),
    );
  }

  // ------------------------------------------------------------------ composer

  modeOf() {
    const d = this.detail;
    if (!d) return null;
    const open = d.window.open && Date.parse(d.window.closes_at) > Date.now();
    return `${open ? "open" : "closed"}:${d.attachments?.agents ? "attach" : "plain"}`;
  }

  renderComposer() {
    const mode = this.modeOf();
    const templatesKey = JSON.stringify(this.detail.templates);
    if (mode === this.composerMode && templatesKey === this.templatesShown) return;
    const draft = this.messageBox?.value || "";
    this.composerMode = mode;
    this.templatesShown = templatesKey;
    const p = this.prefix;
    const open = mode.startsWith("open");
    const d = this.detail;

    this.messageBox = el("textarea", {
      id: `${p}-message`,
      name: "message",
      rows: "3",
      disabled: !open,
      "aria-describedby": open ? `${p}-hint` : `${p}-closed`,
      onkeydown: (event) => this.onKey(event),
    });
    this.messageBox.value = open ? draft : "";
    this.sendButton = el("button", { type: "submit", class: "primary", disabled: !open }, "Send");
    const parts = [
      el("label", { for: `${p}-message` }, "Message"),
      this.messageBox,
      open
        ? el("p", { id: `${p}-hint`, class: "muted cv-hint" }, "Enter sends, Shift+Enter starts a new line.")
        : el(
            "p",
            { id: `${p}-closed`, class: "cv-closed-reason" },
            `The 24-hour window closed at ${dateTime(d.window.closes_at)} — send an approved template.`,
          ),
    ];
    this.attachField = null;
    const buttons = [this.sendButton];
    if (open && d.attachments?.agents) {
      const urlId = `${p}-attach-url`;
      const attachButton = el(
        "button",
        { type: "button", "aria-expanded": "false", "aria-controls": `${p}-attach` },
        "Attach",
      );
      this.attachField = el("input", { id: urlId, type: "url", name: "media_url", placeholder: "https://…" });
      const attachBox = el(
        "div",
        { id: `${p}-attach`, class: "cv-attach", hidden: true },
        el("label", { for: urlId }, "Attachment URL"),
        this.attachField,
      );
      attachButton.addEventListener("click", () => {
        const show = attachBox.hidden;
        attachBox.hidden = !show;
        attachButton.setAttribute("aria-expanded", String(show));
        if (show) this.attachField.focus();
        else this.attachField.value = "";
      });
      buttons.unshift(attachButton);
      parts.push(attachBox);
    }
    parts.push(el("div", { class: "cv-buttons" }, ...buttons));
    const textForm = el(
      "form",
      { class: "cv-text-form", onsubmit: (event) => { event.preventDefault(); this.sendText(); } },
      ...parts,
    );
    const templateForm = this.templateForm(open);
    this.composer.replaceChildren(textForm, templateForm);
  }

  templateForm(open) {
    const p = this.prefix;
    const templates = this.detail.templates || [];
    if (!templates.length) {
      return open ? null : el("p", { class: "muted" }, "This workstream has no approved templates.");
    }
    const selectId = `${p}-template`;
    const select = el(
      "select",
      { id: selectId, name: "template" },
      templates.map((t, i) => el("option", { value: String(i) }, `${t.name} (${t.language})`)),
    );
    const fields = el("div", { class: "cv-template-fields" });
    const preview = el("p", { class: "cv-template-preview" });
    const inputs = new Map();
    const fill = () => {
      const t = templates[Number(select.value)];
      preview.textContent = t.text.replace(/\{\{\s*([A-Za-z0-9_]+)\s*\}\}/g, (whole, name) =>
        inputs.get(name)?.value || whole,
      );
    };
    const pick = () => {
      const t = templates[Number(select.value)];
      inputs.clear();
      fields.replaceChildren(
        ...t.variables.map((name, i) => {
          const id = `${p}-var-${i}`;
          const input = el("input", { id, name: `var-${name}`, type: "text", required: true, oninput: fill });
          inputs.set(name, input);
          return el("div", { class: "cv-field" }, el("label", { for: id }, `Value for {{${name}}}`), input);
        }),
      );
      fill();
    };
    select.addEventListener("change", pick);
    pick();
    const form = el(
      "form",
      {
        class: "cv-template-form",
        onsubmit: (event) => {
          event.preventDefault();
          const t = templates[Number(select.value)];
          const variables = Object.fromEntries([...inputs].map(([name, input]) => [name, input.value]));
          this.send({ template: { name: t.name, variables } }, form.querySelector("button[type=submit]"), () => {
            for (const input of inputs.values()) input.value = "";
            fill();
          });
        },
      },
      el("label", { for: selectId }, "Template"),
      select,
      fields,
      // Folded: the filled-in text is what the thread shows once sent, not a second copy.
      el("details", { class: "cv-preview" }, el("summary", {}, "Preview"), preview),
      el("div", { class: "cv-buttons" }, el("button", { type: "submit", class: "primary" }, "Send template")),
    );
    if (!open) return form;
    // Inside the window a template is optional: folded away under the free-text composer.
    return el("details", { class: "cv-templates" }, el("summary", {}, "Send an approved template"), form);
  }

  onKey(event) {
    // Enter sends; Shift+Enter is a new line; an IME's Enter confirms a word, never sends
    // (https://developer.mozilla.org/en-US/docs/Web/API/Element/keydown_event: isComposing, 229).
    if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) return;
    event.preventDefault();
    this.sendText();
  }

  sendText() {
    const text = this.messageBox.value;
    const url = this.attachField?.value.trim() || "";
    if (!text.trim() && !url) {
      this.composerError.textContent = "Write a message first.";
      return;
    }
    const payload = url ? { text: text.trim() ? text : null, media_urls: [url] } : { text };
    this.send(payload, this.sendButton, () => {
      this.messageBox.value = "";
      if (this.attachField) this.attachField.value = "";
      this.messageBox.focus();
    });
  }

  async send(payload, button, onSent) {
    if (this.sending) return;
    const body = JSON.stringify(payload);
    // The same send tried again (a lost answer) keeps its key: the router answers the first
    // result instead of sending twice. Anything else is a new send with a new key.
    if (!this.sendKey || this.sendKey.payload !== body) this.sendKey = { payload: body, key: newKey() };
    this.sending = true;
    if (button) button.disabled = true;
    this.composerError.textContent = "";
    try {
      await api("POST", `${this.base}/messages`, payload, { idempotencyKey: this.sendKey.key });
      this.sendKey = null;
      onSent();
      await this.loadMessages();
      this.thread.scrollTop = this.thread.scrollHeight;
    } catch (err) {
      if (err instanceof ApiError && err.status >= 400 && err.status < 500) this.sendKey = null;
      this.composerError.textContent = errorText(err);
      if (err instanceof ApiError && err.status === 422) {
        this.loadMessages(); // a refused message is recorded as rejected
        if (err.code === "window_closed") this.loadDetail();
      }
      if (err instanceof ApiError && err.status === 404) this.showGone("This conversation is closed or no longer yours.");
    } finally {
      this.sending = false;
      if (button && button.isConnected) button.disabled = button === this.sendButton && this.messageBox.disabled;
    }
  }

  // ------------------------------------------------------------------ end and transfer

  async end() {
    this.headerError.textContent = "";
    this.endButton.disabled = true;
    try {
      const moved = await api("POST", `${this.base}/close`, {});
      this.ctx.refresh?.();
      if (moved.state === "closed") this.showGone("You ended this conversation.");
      else await this.loadDetail();
    } catch (err) {
      this.headerError.textContent = errorText(err);
    } finally {
      if (this.endButton.isConnected) this.endButton.disabled = this.gone;
    }
  }

  async openTransfer() {
    const p = this.prefix;
    if (!this.transferDialog) {
      this.queueSelect = el("select", { id: `${p}-tq`, name: "queue" });
      this.agentSelect = el("select", { id: `${p}-ta`, name: "agent" });
      this.transferError = el("p", { class: "cv-error", role: "alert" });
      const radio = (value, label, checked) =>
        el(
          "label",
          { class: "cv-radio" },
          el("input", { type: "radio", name: `${p}-target`, value, checked, onchange: () => this.syncTarget() }),
          ` ${label}`,
        );
      this.transferForm = el(
        "form",
        { method: "dialog", onsubmit: (event) => { event.preventDefault(); this.transfer(); } },
        el("h2", { id: `${p}-transfer-title` }, "Transfer conversation"),
        el(
          "fieldset",
          {},
          el("legend", {}, "Transfer to"),
          radio("queue", "a queue", true),
          radio("agent", "an agent", false),
        ),
        el("div", { class: "cv-field", dataset: { target: "queue" } }, el("label", { for: `${p}-tq` }, "Queue"), this.queueSelect),
        el("div", { class: "cv-field", dataset: { target: "agent" }, hidden: true }, el("label", { for: `${p}-ta` }, "Agent"), this.agentSelect),
        this.transferError,
        el(
          "div",
          { class: "cv-buttons" },
          el("button", { type: "button", onclick: () => this.transferDialog.close() }, "Cancel"),
          el("button", { type: "submit", class: "primary" }, "Confirm transfer"),
        ),
      );
      // A modal <dialog> makes the rest of the page inert and closes on Esc
      // (https://developer.mozilla.org/en-US/docs/Web/API/HTMLDialogElement/showModal).
      this.transferDialog = el(
        "dialog",
        { class: "cv-dialog", "aria-labelledby": `${p}-transfer-title` },
        this.transferForm,
      );
      this.root.append(this.transferDialog);
    }
    this.transferError.textContent = "";
    this.transferDialog.showModal();
    try {
      const [queues, agents] = await Promise.all([api("GET", "/api/queues"), api("GET", "/api/agents")]);
      const current = this.detail?.queue;
      this.queueSelect.replaceChildren(
        ...queues.map((q) =>
          el("option", { value: q.name, disabled: q.name === current }, q.name === current ? `${q.name} (current)` : q.name),
        ),
      );
      const firstOther = queues.find((q) => q.name !== current);
      if (firstOther) this.queueSelect.value = firstOther.name;
      this.agentSelect.replaceChildren(
        ...(agents.length
          ? agents.map((a) => el("option", { value: a.id }, `${a.name} (${a.presence})`))
          : [el("option", { value: "", disabled: true }, "No other agents")]),
      );
    } catch (err) {
      this.transferError.textContent = errorText(err);
    }
  }

  syncTarget() {
    const target = this.transferForm.querySelector(`input[name="${this.prefix}-target"]:checked`).value;
    for (const field of this.transferForm.querySelectorAll("[data-target]")) {
      field.hidden = field.dataset.target !== target;
    }
  }

  async transfer() {
    const target = this.transferForm.querySelector(`input[name="${this.prefix}-target"]:checked`).value;
    const body = target === "queue" ? { queue: this.queueSelect.value } : { agent_id: this.agentSelect.value };
    if (!Object.values(body)[0]) {
      this.transferError.textContent = `Choose ${target === "queue" ? "a queue" : "an agent"} first.`;
      return;
    }
    const submit = this.transferForm.querySelector("button[type=submit]");
    submit.disabled = true;
    this.transferError.textContent = "";
    try {
      const moved = await api("POST", `${this.base}/transfer`, body);
      this.transferDialog.close();
      this.ctx.refresh?.();
      const where = moved.queue
        ? `to queue ${moved.queue}`
        : `to ${this.agentSelect.selectedOptions[0]?.textContent || "another agent"}`;
      this.showGone(`You transferred this conversation ${where}.`);
    } catch (err) {
      this.transferError.textContent = errorText(err);
    } finally {
      submit.disabled = false;
    }
  }

  /** The conversation left this agent: say so and stop acting on it. */
  showGone(text) {
    if (this.gone) return;
    this.gone = true;
    clearInterval(this.ticker);
    this.transferDialog?.close();
    this.transferButton.disabled = true;
    this.endButton.disabled = true;
    this.wrapUpLine.hidden = true;
    this.windowLine.textContent = "";
    this.stateLine.replaceChildren(el("strong", {}, text));
    this.composer.replaceChildren(el("p", { class: "muted" }, "Nothing more can be sent from here."));
    this.ctx.refresh?.();
  }
}
