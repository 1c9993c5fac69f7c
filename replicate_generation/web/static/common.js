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
