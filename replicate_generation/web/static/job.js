"use strict";
// One job: its items loaded once (a page at a time), then kept live by the job's event stream.
const JOB_ID = document.getElementById("job").dataset.jobId;
const JOB_PATH = "jobs/" + encodeURIComponent(JOB_ID);
const VIDEO = /\.(mp4|webm|mov)$/i;
const AUDIO = /\.(wav|mp3|ogg|flac|m4a)$/i;
const items = new Map();  // index -> the item as GET /jobs/<id> has it, kept up by events
let job = null;
let nextPage = null;

function fileName(url) {
  return decodeURIComponent(url.split("/").pop());
}

function media(url, item) {
  const src = "/console/api" + url;
  if (VIDEO.test(url)) return el("video", {src, controls: "", preload: "metadata"});
  if (AUDIO.test(url)) return el("audio", {src, controls: "", preload: "none"});
  const open = el("button", {type: "button", class: "thumb", "data-url": url,
                             "aria-label": "View " + fileName(url) + " larger"});
  open.append(el("img", {src, loading: "lazy", alt: item.prompt || fileName(url)}));
  open.addEventListener("click", () => lightbox.show(url));
  return open;
}

function placeholder(item) {
  const box = el("div", {class: "placeholder placeholder-" + item.state});
  if (item.state === "running" || item.state === "queued") {
    box.append(el("span", {class: item.state === "running" ? "spinner" : "skeleton",
                           "aria-hidden": "true"}));
  }
  box.append(el("span", {class: "placeholder-text"}, {
    queued: "waiting", running: "generating…", failed: "failed", canceled: "canceled",
    expired: "expired", succeeded: "no file"}[item.state] || item.state));
  return box;
}

function modelLine(item) {
  const used = item.model_used;
  const line = el("div", {class: "meta"}, item.model_requested);
  if (used && used !== item.model_requested) {
    line.append(" → ", el("strong", {}, used), " (fallback)");
  }
  const tried = [...new Set(item.attempts.map((a) => a.model))];
  if (tried.length > 1) line.append(el("div", {class: "tried"}, "tried: " + tried.join(", ")));
  return line;
}

function itemCard(item) {
  const card = el("figure", {class: "item state-" + item.state, "data-index": item.index});
  const shown = el("div", {class: "item-media"});
  if (item.urls.length) shown.append(...item.urls.map((url) => media(url, item)));
  else shown.append(placeholder(item));
  const caption = el("figcaption");
  const names = item.urls.map(fileName).join(", ");
  const title = el("div", {class: "item-title"});
  title.append(el("span", {class: "file-name"}, names || item.name || "item " + (item.index + 1)),
               badge(item.state));
  caption.append(title, el("div", {class: "prompt"}, item.prompt || ""), modelLine(item),
                 el("div", {class: "meta"}, "cost " + money(item.cost_usd) +
                    (item.attempts.length > 1 ? " · " + item.attempts.length + " attempts" : "")));
  if (item.prediction_id) caption.append(el("div", {class: "meta"}, "prediction " + item.prediction_id));
  if (item.error && item.state !== "canceled") {
    caption.append(el("div", {class: "error why"}, item.error));
  }
  for (const url of item.urls) {
    const link = el("a", {href: "/console/api" + url, target: "_blank", rel: "noopener",
                          class: "open"}, "Open " + fileName(url));
    caption.append(link);
  }
  card.append(shown, caption);
  return card;
}

function showItem(item) {
  const old = document.querySelector('#gallery .item[data-index="' + item.index + '"]');
  const card = itemCard(item);
  if (old) old.replaceWith(card);
  else document.getElementById("gallery").append(card);
}

function showJob() {
  const state = document.getElementById("job-state");
  state.replaceChildren(badge(job.state));
  state.dataset.state = job.state;
  const eta = etaText(job.counts, job.total, job.started_at || job.created_at, job.state);
  document.getElementById("job-progress").replaceChildren(progressEl(job.counts, job.total, eta));
  document.getElementById("job-counts").textContent = countsText(job.counts) + " of " + job.total;
  document.getElementById("job-cost").textContent = "cost " + money(job.cost_usd);
  document.getElementById("job-created").replaceChildren("created ", timeEl(job.created_at));
  const cancel = document.getElementById("cancel");
  cancel.disabled = TERMINAL.includes(job.state) || job.state === "cancel_requested";
  cancel.textContent = job.state === "cancel_requested" ? "Canceling…" : "Cancel";
  document.getElementById("retry").disabled = !(job.counts.failed || job.counts.expired);
  const anyFile = job.counts.succeeded > 0 || [...items.values()].some((i) => i.urls.length);
  const archive = document.getElementById("archive");
  if (anyFile) archive.setAttribute("href", "/console/api/" + JOB_PATH + "/archive");
  else archive.removeAttribute("href");
  archive.setAttribute("aria-disabled", String(!anyFile));
  document.getElementById("more").hidden = !nextPage;
}

// One handler per event kind; each event carries the job's counts. The stream replays the job
// from its start, so a handler never moves an item back from a final state.
const HANDLERS = {
  "job.created": () => {},
  "item.state": (data) => {
    const item = items.get(data.index);
    if (job.state === "queued" && data.state === "running") job.state = "running";
    if ("job_cost_usd" in data) job.cost_usd = data.job_cost_usd;
    if (!item || (ENDED.includes(item.state) && !ENDED.includes(data.state))) return;
    item.state = data.state;
    for (const key of ["model_used", "cost_usd", "error", "error_type"]) {
      if (key in data) item[key] = data[key];
    }
    showItem(item);
  },
  "item.file": (data) => {
    const item = items.get(data.index);
    if (!item || item.urls.includes(data.url)) return;
    item.urls.push(data.url);
    showItem(item);
  },
  "items.failed": (data) => endItems(data.indexes, "failed", data.error_type),
  "job.cancel_requested": (data) => {
    if (!TERMINAL.includes(job.state)) job.state = "cancel_requested";
    endItems(data.canceled, "canceled", null);
  },
  "job.finished": (data, stream) => {
    job.state = data.state;
    job.cost_usd = data.cost_usd;
    stream.close();
  },
};

function endItems(indexes, state, errorType) {
  for (const index of indexes || []) {
    const item = items.get(index);
    if (!item || ENDED.includes(item.state)) continue;
    item.state = state;
    item.error_type = errorType;
    showItem(item);
  }
}

function onEvent(handle) {
  return (data, stream) => {
    job.counts = data.counts || job.counts;
    handle(data, stream);
    showJob();
  };
}

// The job as the API has it now (after a refused stream, or at the start).
async function read() {
  const fresh = await api("GET", JOB_PATH);
  job = job ? {...job, ...fresh} : fresh;
  for (const item of fresh.items) {
    items.set(item.index, item);
    showItem(item);
  }
  nextPage = nextPage || fresh.items_next;
  showJob();
}

async function load() {
  await read();
  if (TERMINAL.includes(job.state)) return;
  const handlers = Object.fromEntries(Object.entries(HANDLERS).map(([k, h]) => [k, onEvent(h)]));
  const stream = follow(JOB_PATH + "/events", handlers, async () => {
    await read();
    if (TERMINAL.includes(job.state)) stream.close();  // it ended meanwhile: a 204 now
  });
}

// The next page of items (GET .../items), added below the others.
async function more() {
  const page = await api("GET", nextPage.replace(/^\//, ""));
  for (const item of page.data) {
    items.set(item.index, item);
    showItem(item);
  }
  nextPage = page.next;
  showJob();
}

// The lightbox: every image of the gallery in order, previous/next by button or arrow key.
const lightbox = {
  dialog: document.getElementById("lightbox"),
  urls() {
    return [...document.querySelectorAll("#gallery .thumb")].map((b) => b.dataset.url);
  },
  show(url) {
    this.current = url;
    const img = el("img", {src: "/console/api" + url, alt: fileName(url)});
    this.dialog.querySelector(".lightbox-media").replaceChildren(img);
    const urls = this.urls();
    this.dialog.querySelector(".lightbox-caption").textContent =
      fileName(url) + " (" + (urls.indexOf(url) + 1) + " of " + urls.length + ")";
    if (!this.dialog.open) this.dialog.showModal();
  },
  step(delta) {
    const urls = this.urls();
    if (!urls.length) return;
    const at = urls.indexOf(this.current);
    this.show(urls[(at + delta + urls.length) % urls.length]);
  },
};

function message(error) {
  document.getElementById("job-message").textContent = error.message;
}

async function act(path, then) {
  try { then(await api("POST", JOB_PATH + "/" + path)); }
  catch (error) { message(error); }
}

// The answer may arrive after the stream's job.finished: it never moves the job back from it.
document.getElementById("cancel").addEventListener("click", () => act("cancel", (body) => {
  if (TERMINAL.includes(job.state)) return;
  if (body.state) job.state = body.state;
  if (body.counts) job.counts = body.counts;
  showJob();
}));
document.getElementById("more").addEventListener("click", () => more().catch(message));
document.getElementById("retry").addEventListener("click", () => act("retry", (body) => {
  window.location.href = "/console/jobs/" + body.id;
}));
document.getElementById("lightbox-prev").addEventListener("click", () => lightbox.step(-1));
document.getElementById("lightbox-next").addEventListener("click", () => lightbox.step(1));
document.getElementById("lightbox-close").addEventListener("click", () => lightbox.dialog.close());
lightbox.dialog.addEventListener("keydown", (event) => {
  if (event.key === "ArrowLeft") lightbox.step(-1);
  if (event.key === "ArrowRight") lightbox.step(1);
});
load().catch(message);
