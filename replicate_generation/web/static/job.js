"use strict";
// One job: a gallery in input order, refreshed every two seconds until the job is over.
const JOB_ID = document.getElementById("job").dataset.jobId;
const VIDEO = /\.(mp4|webm|mov)$/i;
const AUDIO = /\.(wav|mp3|ogg|flac)$/i;

function media(url) {
  const src = "/console/api" + url;
  if (VIDEO.test(url)) return el("video", {src, controls: "", preload: "none"});
  if (AUDIO.test(url)) return el("audio", {src, controls: "", preload: "none"});
  return el("img", {src, loading: "lazy", alt: url.split("/").pop()});
}

function itemCard(item) {
  const card = el("figure", {class: "item state-" + item.state, "data-index": item.index});
  for (const url of item.urls) {
    const link = el("a", {href: "/console/api" + url, target: "_blank", class: "open"});
    link.append(media(url));
    card.append(link);
  }
  const caption = el("figcaption");
  const names = item.files.map((f) => f.split("/").pop()).join(", ");
  caption.append(el("div", {class: "file-name"}, names || "(no file yet)"),
                 el("div", {class: "prompt"}, item.prompt),
                 el("div", {class: "item-state"}, item.state),
                 el("div", {}, "model: " + item.model_requested +
                    (item.model_used && item.model_used !== item.model_requested
                      ? " → " + item.model_used : "")),
                 el("div", {}, "attempts: " + item.attempts.length),
                 el("div", {}, "cost: " + (item.cost_usd === null ? "–" : "$" + item.cost_usd)));
  if (item.error) caption.append(el("div", {class: "error"}, item.error));
  card.append(caption);
  return card;
}

let shown = "";
async function refresh() {
  const job = await api("GET", "jobs/" + encodeURIComponent(JOB_ID));
  document.getElementById("job-state").textContent = job.state;
  document.getElementById("job-counts").textContent = countsText(job.counts) + " of " + job.total;
  document.getElementById("job-cost").textContent = "cost: $" + job.cost_usd;
  document.getElementById("cancel").disabled = TERMINAL.includes(job.state);
  document.getElementById("retry").disabled = !(job.counts.failed || job.counts.expired);
  const signature = JSON.stringify(job.items.map((i) => [i.state, i.urls, i.error]));
  if (signature !== shown) {  // rebuilt only on change: lazy images and players keep their state
    shown = signature;
    document.getElementById("gallery").replaceChildren(...job.items.map(itemCard));
  }
  return job;
}

async function poll() {
  try {
    const job = await refresh();
    if (!TERMINAL.includes(job.state)) setTimeout(poll, 2000);
  } catch (error) {
    document.getElementById("job-message").textContent = error.message;
  }
}

async function act(path, then) {
  try { then(await api("POST", "jobs/" + encodeURIComponent(JOB_ID) + "/" + path)); }
  catch (error) { document.getElementById("job-message").textContent = error.message; }
}

document.getElementById("cancel").addEventListener("click", () => act("cancel", refresh));
document.getElementById("retry").addEventListener("click", () => act("retry", (job) => {
  window.location.href = "/console/jobs/" + job.id;
}));
poll();
