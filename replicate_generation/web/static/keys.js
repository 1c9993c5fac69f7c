"use strict";
// The admin's keys page: mint, rotate, revoke through /console/api/keys (the API's own checks);
// a new secret is shown once, never stored in the page or the browser.
function keysMessage(text) {
  document.getElementById("keys-message").textContent = text;
}

function showSecret(title, secret) {
  document.getElementById("secret-title").textContent = title;
  document.getElementById("secret").textContent = secret;
  document.getElementById("secret-box").hidden = false;
}

function hideSecret() {
  document.getElementById("secret").textContent = "";
  document.getElementById("secret-box").hidden = true;
}

// A button that asks once more before it acts ("Revoke" becomes "Really revoke?").
function confirmButton(label, ask, act) {
  const button = el("button", {type: "button"}, label);
  button.addEventListener("click", () => {
    if (button.dataset.armed !== "1") {
      button.dataset.armed = "1";
      button.textContent = ask;
      return;
    }
    act().catch((error) => keysMessage(error.message));
  });
  return button;
}

function keyRow(key) {
  const row = el("tr", {"data-key-id": key.id, class: "key-row"});
  const state = el("td", {class: "state"});
  state.append(badge(key.state));
  const created = el("td");
  created.append(timeEl(key.created_at));
  const actions = el("td");
  const buttons = el("div", {class: "actions"});
  actions.append(buttons);
  if (key.state === "active") {
    buttons.append(
      confirmButton("Rotate", "Really rotate?", async () => {
        const rotated = await api("POST", "keys/" + key.id + "/rotate", {grace_seconds: 3600});
        showSecret("New secret for " + rotated.name + " (the old one works one more hour).",
                   rotated.key);
        await listKeys();
      }),
      confirmButton("Revoke", "Really revoke?", async () => {
        await api("DELETE", "keys/" + key.id);
        await listKeys();
      }));
  }
  const budget = key.budget_usd === null ? "none" : money(key.budget_usd) + " / " + key.budget_period;
  row.append(el("td", {class: "key-name"}, key.name), el("td", {class: "key-prefix"}, key.prefix),
             state, el("td", {}, budget),
             el("td", {}, key.spent_usd === undefined ? "–" : money(key.spent_usd)), created, actions);
  const headings = [...document.querySelectorAll("#keys thead th")].map((th) => th.textContent);
  [...row.children].forEach((cell, i) => cell.setAttribute("data-label", headings[i]));
  return row;
}

async function listKeys() {
  const list = await api("GET", "keys");
  document.querySelector("#keys tbody").replaceChildren(...list.data.reverse().map(keyRow));
}

async function mint(event) {
  event.preventDefault();
  const body = {name: document.getElementById("mint-name").value.trim()};
  const budget = document.getElementById("mint-budget").value;
  if (budget !== "") {
    body.budget_usd = parseFloat(budget);
    body.budget_period = document.getElementById("mint-period").value;
  }
  const concurrent = document.getElementById("mint-concurrent").value;
  if (concurrent !== "") body.max_concurrent = parseInt(concurrent, 10);
  try {
    const key = await api("POST", "keys", body);
    keysMessage("");
    showSecret("Secret for " + key.name + ".", key.key);
    document.getElementById("mint").reset();
    await listKeys();
  } catch (error) { keysMessage(error.message); }
}

document.getElementById("mint").addEventListener("submit", mint);
document.getElementById("hide-secret").addEventListener("click", hideSecret);
document.getElementById("copy-secret").addEventListener("click", () => {
  navigator.clipboard.writeText(document.getElementById("secret").textContent)
    .then(() => keysMessage(""), () => keysMessage("Copy failed: select the secret and copy it."));
});
listKeys().catch((error) => keysMessage(error.message));
