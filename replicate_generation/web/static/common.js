"use strict";
// Shared helpers: every call goes to /console/api, which adds the session's key on the server.
const CSRF = document.querySelector('meta[name="csrf-token"]').content;

async function api(method, path, body) {
  const options = {method, headers: {"X-CSRF-Token": CSRF}, credentials: "same-origin"};
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch("/console/api/" + path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
  return data;
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function countsText(counts) {
  return Object.entries(counts || {}).filter(([, n]) => n > 0)
    .map(([state, n]) => state + ": " + n).join(", ") || "none";
}

const TERMINAL = ["succeeded", "partially_failed", "failed", "canceled"];
const ENDED = ["succeeded", "failed", "canceled", "expired"];  // an item's final states

// Dollars to the cent; a non-zero cost under a cent says so rather than "$0.00".
function money(usd) {
  if (usd === null || usd === undefined) return "–";
  const value = Number(usd);
  if (value > 0 && value < 0.005) return "< $0.01";
  return "$" + (Math.round(value * 100 + 1e-6) / 100).toFixed(2);
}

// "12 s ago", "3 min ago", "2 h ago", "4 days ago"; the exact time goes in the title.
function ago(iso) {
  if (!iso) return "";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 45) return "just now";
  if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
  if (seconds < 86400) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " days ago";
}

function timeEl(iso) {
  const node = el("time", {datetime: iso || "", title: iso || "", class: "ago"}, ago(iso));
  return node;
}

// Every <time class="ago"> re-read twice a minute: relative times stay true, no request made.
setInterval(() => {
  for (const node of document.querySelectorAll("time.ago")) node.textContent = ago(node.dateTime);
}, 30000);

function duration(seconds) {
  if (seconds < 60) return Math.max(1, Math.round(seconds)) + " s";
  if (seconds < 3600) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function finishedCount(counts) {
  return ENDED.reduce((sum, state) => sum + ((counts || {})[state] || 0), 0);
}

// A progress bar (role=progressbar) for `counts` of `total`; `eta` is text or "".
function progressEl(counts, total, eta) {
  const done = finishedCount(counts);
  const wrap = el("div", {class: "progress", role: "progressbar", "aria-valuemin": "0",
                          "aria-valuemax": String(total), "aria-valuenow": String(done),
                          "aria-label": done + " of " + total + " done"});
  const bar = el("div", {class: "progress-bar"});
  for (const state of ["succeeded", "failed", "canceled", "expired"]) {
    const n = (counts || {})[state] || 0;
    if (!n) continue;
    const part = el("span", {class: "part part-" + state});
    part.style.width = (100 * n / Math.max(total, 1)) + "%";  // CSSOM: allowed under the CSP
    bar.append(part);
  }
  wrap.append(bar, el("span", {class: "progress-text"},
                      done + " / " + total + (eta ? " · " + eta : "")));
  return wrap;
}

// Seconds left, from the pace since `startedIso` (null until one item has finished).
function etaText(counts, total, startedIso, state) {
  if (TERMINAL.includes(state) || state === "cancel_requested") return "";
  const done = finishedCount(counts);
  if (!startedIso || !done) return (counts || {}).running ? "starting" : "queued";
  const elapsed = (Date.now() - Date.parse(startedIso)) / 1000;
  return "about " + duration(elapsed / done * (total - done)) + " left";
}

function badge(state) {
  return el("span", {class: "badge badge-" + state}, state.replace("_", " "));
}

// The stream of `path` (through the console's forwarder); `handlers` maps event kinds, each
// called with the event's data and the stream (whose close() ends it). The browser reconnects by
// itself after a dropped connection; a refused one (a 429: too many streams) is opened again
// here after a pause, from the last event seen, once `resync` (if given) has run.
function follow(path, handlers, resync) {
  const stream = {closed: false, source: null, lastId: "", failures: 0,
                  close() { this.closed = true; this.source.close(); }};
  const open = () => {
    if (stream.closed) return;
    const from = stream.lastId ? (path.includes("?") ? "&" : "?") + "last_event_id=" + stream.lastId : "";
    const source = stream.source = new EventSource("/console/api/" + path + from);
    for (const [kind, handle] of Object.entries(handlers)) {
      source.addEventListener(kind, (message) => {
        stream.lastId = message.lastEventId || stream.lastId;
        stream.failures = 0;
        handle(JSON.parse(message.data), stream);
      });
    }
    source.addEventListener("error", () => {
      if (source.readyState !== EventSource.CLOSED || stream.closed) return;
      stream.failures += 1;
      const again = () => (resync ? resync().then(open, open) : open());
      setTimeout(again, Math.min(30000, 1000 * 2 ** stream.failures));
    });
  };
  open();
  return stream;
}
