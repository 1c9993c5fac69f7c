"use strict";
// The console's main page: the form built from /models, the jobs list (loaded once, then kept
// live by GET /events) and the status panel.
let MODELS = {};
const jobs = new Map();  // job id -> the job as GET /jobs has it, kept up by events
const jobModels = {};  // job id -> the models its items requested (they never change)
let submitting = null;  // the submission in flight (a promise of its job)
const reading = {};  // job id -> the read of a job first met in an event
const thumbs = {};  // job id -> the URL of its first picture
const references = {};  // parameter name -> data: URIs of the attached files
const LAST_MODEL = "console.model";
const IMAGE = /\.(png|jpe?g|webp|gif)$/i;

function fillModels(data) {
  MODELS = data.models;
  const select = document.getElementById("model");
  const filter = document.getElementById("filter-model");
  for (const id of data.supported_models) {
    select.append(el("option", {value: id}, id));
    filter.append(el("option", {value: id}, id));
  }
  const last = localStorage.getItem(LAST_MODEL);
  select.value = data.supported_models.includes(last) ? last
    : data.supported_models.includes("flux-dev") ? "flux-dev" : data.supported_models[0];
  select.addEventListener("change", () => {
    localStorage.setItem(LAST_MODEL, select.value);
    showParams();
  });
  showParams();
  // Disabled in the page until now: nothing is sent before the form knows its model.
  document.getElementById("estimate").disabled = false;
  document.getElementById("submit").disabled = false;
}

function showParams() {
  const spec = MODELS[document.getElementById("model").value];
  document.getElementById("model-description").textContent = spec.description || "";
  const fields = document.getElementById("params");
  fields.replaceChildren();
  document.getElementById("references").replaceChildren();
  for (const key of Object.keys(references)) delete references[key];
  for (const [name, param] of Object.entries(spec.parameters)) {
    if (name === "prompt") continue;
    if (param.type === "uri" || param.type === "uri_list") {
      addReference(name, param, spec.reference_input);
      continue;
    }
    fields.append(paramRow(name, param));
  }
}

function control(name, param, id) {
  const attrs = {id, "data-param": name, "data-type": param.type,
                 "aria-describedby": id + "-about"};
  if (param.type === "boolean") {
    const box = el("input", {...attrs, type: "checkbox"});
    box.checked = param.default === true;
    box.dataset.default = String(param.default === true);
    return box;
  }
  if (param.choices) {
    const select = el("select", attrs);
    if (param.default === null) select.append(el("option", {value: ""}, "(default)"));
    for (const choice of param.choices) {
      select.append(el("option", {value: String(choice)}, choice));
    }
    select.value = param.default === null ? "" : String(param.default);
    select.dataset.default = select.value;
    return select;
  }
  if (param.type === "integer" || param.type === "number") {
    const input = el("input", {...attrs, type: "number", inputmode: "decimal",
                               step: param.type === "integer" ? "1" : "any",
                               placeholder: param.default === null ? "" : String(param.default)});
    if (param.minimum !== undefined) input.min = String(param.minimum);
    if (param.maximum !== undefined) input.max = String(param.maximum);
    return input;
  }
  const text = el("input", {...attrs, type: "text",
                            placeholder: param.default === null ? "" : String(param.default)});
  if (param.max_length) text.maxLength = param.max_length;
  return text;
}

function paramRow(name, param) {
  const id = "param-" + name;
  const row = el("div", {class: "field-row"});
  row.append(el("label", {for: id, class: "field-name"}, name));
  const cell = el("div", {class: "field-control"});
  const range = param.minimum !== undefined && param.maximum !== undefined
    ? " (" + param.minimum + " to " + param.maximum + ")" : "";
  const about = (param.description || "") + range +
    (param.default === null || param.type === "boolean" ? "" : " Default: " + param.default + ".");
  cell.append(control(name, param, id), el("span", {id: id + "-about", class: "description"}, about));
  row.append(cell);
  return row;
}

// What a file input accepts: the model's reference media for its reference key, else a guess.
function mediaKind(name, reference) {
  if (reference && reference.key === name && reference.media) return reference.media;
  if (/audio|voice|speech/i.test(name)) return "audio";
  if (/video/i.test(name)) return "video";
  return "image";
}

function addReference(name, param, reference) {
  const kind = mediaKind(name, reference);
  const id = "ref-" + name;
  const row = el("div", {class: "field-row"});
  row.append(el("label", {for: id, class: "field-name"},
                "Reference " + kind + " (" + name + ")"));
  const cell = el("div", {class: "field-control"});
  const input = el("input", {type: "file", id, accept: kind + "/*", "data-ref": name,
                             "aria-describedby": id + "-about"});
  if (param.type === "uri_list") input.multiple = true;
  input.addEventListener("change", async () => {
    references[name] = await Promise.all([...input.files].map(readDataUri));
  });
  cell.append(input, el("span", {id: id + "-about", class: "description"}, param.description || ""));
  row.append(cell);
  document.getElementById("references").append(row);
}

function readDataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function addPrompt(prompt, fileName) {
  const row = el("div", {class: "prompt-row"});
  const text = el("input", {class: "prompt", placeholder: "prompt", "aria-label": "Prompt"});
  const name = el("input", {class: "file-name", placeholder: "file name (optional)",
                            "aria-label": "File name (optional)"});
  text.value = prompt || "";
  name.value = fileName || "";
  const remove = el("button", {type: "button", class: "remove", "aria-label": "Remove prompt"}, "×");
  remove.addEventListener("click", () => row.remove());
  row.append(text, name, remove);
  document.getElementById("prompts").append(row);
}

function loadCsv() {
  const lines = document.getElementById("csv").value.split(/\r?\n/).filter((l) => l.trim());
  document.getElementById("prompts").replaceChildren();
  for (const line of lines) {
    const comma = line.indexOf(",");
    if (comma < 0) addPrompt(line.trim(), "");
    else addPrompt(line.slice(comma + 1).trim(), line.slice(0, comma).trim());
  }
}

function paramValue(input) {
  const type = input.dataset.type;
  if (type === "boolean") return input.checked === (input.dataset.default === "true") ? undefined : input.checked;
  if (input.value === "" || input.value === input.dataset.default) return undefined;
  return type === "integer" ? parseInt(input.value, 10)
    : type === "number" ? parseFloat(input.value) : input.value;
}

function requestBody() {
  const rows = [...document.querySelectorAll(".prompt-row")]
    .filter((row) => row.querySelector(".prompt").value.trim());
  const body = {model_name: document.getElementById("model").value,
                prompts: rows.map((row) => row.querySelector(".prompt").value.trim())};
  const names = rows.map((row) => row.querySelector(".file-name").value.trim());
  if (names.some((n) => n)) body.custom_filenames = names.map((n, i) => n || "item_" + (i + 1));
  for (const input of document.querySelectorAll("[data-param]")) {
    const value = paramValue(input);
    if (value !== undefined) body[input.dataset.param] = value;
  }
  const spec = MODELS[body.model_name];
  for (const [name, uris] of Object.entries(references)) {
    if (!uris.length) continue;
    body[name] = spec.parameters[name].type === "uri_list" ? uris : uris[0];
  }
  return body;
}

async function estimate() {
  const out = document.getElementById("estimate-result");
  try {
    const result = await api("POST", "generate-batch", {...requestBody(), dry_run: true});
    out.textContent = "Estimated cost: " + money(result.estimated_cost_usd ?? result.cost_usd ?? 0);
  } catch (error) { out.textContent = error.message; }
}

async function submit() {
  const out = document.getElementById("submit-result");
  try {
    const body = requestBody();
    submitting = api("POST", "generate-batch", {...body, async: true});
    const job = await submitting;
    localStorage.setItem(LAST_MODEL, body.model_name);
    out.replaceChildren(el("span", {}, "Submitted "),
                        el("a", {href: "/console/jobs/" + job.id, id: "new-job"}, job.id));
    jobModels[job.id] = [body.model_name];
    jobs.set(job.id, job);
    showJobs();
  } catch (error) { out.textContent = error.message; }
}

async function learn(job) {
  if (jobModels[job.id]) return;
  // One small page, not the whole job: a job's models and thumbnail come from its first items.
  const first = await api("GET", "jobs/" + encodeURIComponent(job.id) + "/items?limit=20");
  jobModels[job.id] = [...new Set(first.data.map((item) => item.model_requested))];
  const picture = first.data.flatMap((item) => item.urls).find((url) => IMAGE.test(url));
  if (picture) thumbs[job.id] = picture;
}

function jobRow(job) {
  const row = el("tr", {"data-job-id": job.id, class: "job-row"});
  const thumb = el("td", {class: "thumb-cell"});
  if (thumbs[job.id]) {
    thumb.append(el("img", {src: "/console/api" + thumbs[job.id], alt: "", class: "job-thumb",
                            loading: "lazy"}));
  } else thumb.append(el("span", {class: "job-thumb", "aria-hidden": "true"}));
  const link = el("td");
  link.append(el("a", {href: "/console/jobs/" + job.id, class: "job-link"}, job.id));
  const state = el("td", {class: "state"});
  state.append(badge(job.state));
  const progress = el("td", {class: "counts"});
  const eta = etaText(job.counts, job.total, job.started_at || job.created_at, job.state);
  progress.append(progressEl(job.counts, job.total, eta));
  const created = el("td");
  created.append(timeEl(job.created_at));
  row.append(thumb, link, state, progress,
             el("td", {}, (jobModels[job.id] || []).join(", ")), el("td", {}, money(job.cost_usd)),
             created);
  return row;
}

function showJobs() {
  const state = document.getElementById("filter-state").value;
  const model = document.getElementById("filter-model").value;
  const shown = [...jobs.values()]
    .filter((job) => !state || job.state === state)
    .filter((job) => !model || (jobModels[job.id] || []).includes(model))
    .sort((a, b) => Date.parse(b.created_at) - Date.parse(a.created_at));
  document.querySelector("#jobs tbody").replaceChildren(...shown.map(jobRow));
  document.getElementById("jobs-empty").hidden = shown.length > 0;
}

async function loadJobs() {
  const list = await api("GET", "jobs?limit=50");
  for (const job of list.data) jobs.set(job.id, job);
  await Promise.all(list.data.map((job) => learn(job).catch(() => {})));
  showJobs();
}

// One handler for every event of GET /events: each carries its job's counts.
async function onJobEvent(kind, data) {
  // Its own submission's answer may still be on its way: that answer makes a row too.
  if (!jobs.has(data.job_id) && submitting) await submitting.catch(() => {});
  if (!jobs.has(data.job_id)) {  // a job this page has not seen (submitted elsewhere): read it once
    reading[data.job_id] = reading[data.job_id] || api("GET", "jobs/" + encodeURIComponent(data.job_id))
      .then(async (read) => { await learn(read).catch(() => {}); jobs.set(read.id, read); });
    await reading[data.job_id];
  }
  const job = jobs.get(data.job_id);
  job.counts = data.counts || job.counts;
  if (kind === "item.state" && job.state === "queued" && data.state === "running") {
    job.state = "running";
    job.started_at = job.started_at || new Date().toISOString();
  }
  if ("job_cost_usd" in data) job.cost_usd = data.job_cost_usd;
  if (kind === "item.file" && !thumbs[job.id] && IMAGE.test(data.url)) thumbs[job.id] = data.url;
  if (kind === "job.cancel_requested" && !TERMINAL.includes(job.state)) job.state = "cancel_requested";
  if (kind === "job.finished") {
    job.state = data.state;
    job.cost_usd = data.cost_usd;
    refreshStatus().catch(() => {});
  }
  showJobs();
}

async function refreshStatus() {
  const status = await api("GET", "status");
  const list = document.getElementById("status");
  const account = status.accounts[0] || {};
  const backoff = Number(account.backoff_remaining || 0);
  const entries = [
    ["Concurrent limit", status.limits.concurrent_limit],
    ["Creates per minute", status.limits.requests_per_minute],
    ["In flight", status.totals.in_flight],
    ["Creates in the last minute", status.totals.creates_last_minute],
    ["Waiting", status.totals.waiting],
    ["Back-off", backoff > 0 ? Math.ceil(backoff) + " s left" : "none"],
  ];
  list.replaceChildren(...entries.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

const KINDS = ["job.created", "item.state", "item.file", "items.failed", "job.cancel_requested",
               "job.finished"];
function followAll() {
  // Subscribed before GET /jobs is read: nothing falls between the two (README, event streams).
  follow("events", Object.fromEntries(KINDS.map((kind) => [kind, (data) => {
    onJobEvent(kind, data).catch((error) => console.warn(error.message));
  }])), loadJobs);
}

document.getElementById("add-prompt").addEventListener("click", () => addPrompt());
document.getElementById("load-csv").addEventListener("click", loadCsv);
document.getElementById("estimate").addEventListener("click", estimate);
document.getElementById("submit").addEventListener("click", submit);
document.getElementById("filter-state").addEventListener("change", showJobs);
document.getElementById("filter-model").addEventListener("change", showJobs);
document.getElementById("refresh-status").addEventListener("click", () => refreshStatus());
addPrompt();
api("GET", "models").then(fillModels).catch((error) => console.warn(error.message));
followAll();
loadJobs().catch((error) => console.warn(error.message));
refreshStatus().catch((error) => console.warn(error.message));
