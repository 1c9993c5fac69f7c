"use strict";
// The console's main page: the form built from /models, the jobs list and the status panel.
let MODELS = {};
const jobModels = {};  // job id -> the models its items requested (they never change)
const references = {};  // parameter name -> data: URIs of the attached files

function fillModels(data) {
  MODELS = data.models;
  const select = document.getElementById("model");
  const filter = document.getElementById("filter-model");
  for (const id of data.supported_models) {
    select.append(el("option", {value: id}, id));
    filter.append(el("option", {value: id}, id));
  }
  select.addEventListener("change", showParams);
  showParams();
}

function showParams() {
  const spec = MODELS[document.getElementById("model").value];
  const body = document.querySelector("#params tbody");
  body.replaceChildren();
  document.getElementById("references").replaceChildren();
  for (const key of Object.keys(references)) delete references[key];
  for (const [name, param] of Object.entries(spec.parameters)) {
    if (name === "prompt") continue;
    if (param.type === "uri" || param.type === "uri_list") { addReference(name, param); continue; }
    body.append(paramRow(name, param));
  }
}

function paramRow(name, param) {
  const row = el("tr");
  row.append(el("td", {}, name), el("td", {}, param.type));
  let input;
  if (param.choices) {
    input = el("select", {"data-param": name, "data-type": param.type});
    input.append(el("option", {value: ""}, "(default)"));
    for (const choice of param.choices) input.append(el("option", {value: String(choice)}, choice));
  } else {
    input = el("input", {"data-param": name, "data-type": param.type,
                         placeholder: param.default === null ? "" : String(param.default)});
  }
  const cell = el("td");
  cell.append(input);
  const hint = (param.default === null ? "" : "default " + param.default) +
    (param.choices ? " (" + param.choices.join(", ") + ")" : "");
  row.append(cell, el("td", {}, hint));
  return row;
}

function addReference(name, param) {
  const label = el("label", {}, "Reference image (" + name + ") ");
  const input = el("input", {type: "file", accept: "image/*", "data-ref": name});
  if (param.type === "uri_list") input.multiple = true;
  input.addEventListener("change", async () => {
    references[name] = await Promise.all([...input.files].map(readDataUri));
  });
  label.append(input);
  document.getElementById("references").append(label);
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
  const text = el("input", {class: "prompt", placeholder: "prompt"});
  const name = el("input", {class: "file-name", placeholder: "file name (optional)"});
  text.value = prompt || "";
  name.value = fileName || "";
  const remove = el("button", {type: "button", class: "remove"}, "×");
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

function requestBody() {
  const rows = [...document.querySelectorAll(".prompt-row")]
    .filter((row) => row.querySelector(".prompt").value.trim());
  const body = {model_name: document.getElementById("model").value,
                prompts: rows.map((row) => row.querySelector(".prompt").value.trim())};
  const names = rows.map((row) => row.querySelector(".file-name").value.trim());
  if (names.some((n) => n)) body.custom_filenames = names.map((n, i) => n || "item_" + (i + 1));
  for (const input of document.querySelectorAll("[data-param]")) {
    if (input.value === "") continue;
    const type = input.dataset.type;
    body[input.dataset.param] = type === "integer" ? parseInt(input.value, 10)
      : type === "number" ? parseFloat(input.value)
      : type === "boolean" ? input.value === "true" : input.value;
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
    out.textContent = "Estimated cost: $" + Number(result.estimated_cost_usd ?? result.cost_usd ?? 0).toFixed(4);
  } catch (error) { out.textContent = error.message; }
}

async function submit() {
  const out = document.getElementById("submit-result");
  try {
    const job = await api("POST", "generate-batch", {...requestBody(), async: true});
    out.replaceChildren(el("span", {}, "Submitted "),
                        el("a", {href: "/console/jobs/" + job.id, id: "new-job"}, job.id));
    refreshJobs();
  } catch (error) { out.textContent = error.message; }
}

async function modelsOf(job) {
  if (!jobModels[job.id]) {
    const full = await api("GET", "jobs/" + encodeURIComponent(job.id));
    jobModels[job.id] = [...new Set(full.items.map((item) => item.model_requested))];
  }
  return jobModels[job.id];
}

async function refreshJobs() {
  const list = await api("GET", "jobs?limit=50");
  const state = document.getElementById("filter-state").value;
  const model = document.getElementById("filter-model").value;
  const rows = [];
  for (const job of list.data) {
    const models = await modelsOf(job);
    if ((state && job.state !== state) || (model && !models.includes(model))) continue;
    const row = el("tr", {"data-job-id": job.id, class: "job-row"});
    const link = el("td");
    link.append(el("a", {href: "/console/jobs/" + job.id}, job.id));
    row.append(link, el("td", {class: "state"}, job.state),
               el("td", {class: "counts"}, countsText(job.counts) + " of " + job.total),
               el("td", {}, models.join(", ")), el("td", {}, job.created_at));
    rows.push(row);
  }
  document.querySelector("#jobs tbody").replaceChildren(...rows);
}

async function refreshStatus() {
  const status = await api("GET", "status");
  const list = document.getElementById("status");
  const account = status.accounts[0] || {};
  const entries = [
    ["Concurrent limit", status.limits.concurrent_limit],
    ["Creates per minute", status.limits.requests_per_minute],
    ["In flight", status.totals.in_flight],
    ["Creates in the last minute", status.totals.creates_last_minute],
    ["Waiting", status.totals.waiting],
    ["Back-off", account.backoff_seconds ?? account.backoff_until ?? "none"],
  ];
  list.replaceChildren(...entries.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function poll() {
  Promise.all([refreshJobs(), refreshStatus()]).catch((error) => console.warn(error.message));
}

document.getElementById("add-prompt").addEventListener("click", () => addPrompt());
document.getElementById("load-csv").addEventListener("click", loadCsv);
document.getElementById("estimate").addEventListener("click", estimate);
document.getElementById("submit").addEventListener("click", submit);
document.getElementById("filter-state").addEventListener("change", poll);
document.getElementById("filter-model").addEventListener("change", poll);
addPrompt();
api("GET", "models").then(fillModels).catch((error) => console.warn(error.message));
poll();
setInterval(poll, 3000);
