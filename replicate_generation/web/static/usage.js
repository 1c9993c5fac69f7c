"use strict";
// The usage page: GET /usage grouped by key, model and day, drawn as stacked daily bars (SVG
// built here: no library) and summed per key and per model.
const SVG = "http://www.w3.org/2000/svg";
const SERIES_CLASSES = 8;  // .s0 ... .s7 in console.css

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

// Every day from `first` to `last` (YYYY-MM-DD, UTC), so quiet days show as gaps.
function daysBetween(first, last) {
  const days = [];
  for (let d = new Date(first + "T00:00:00Z"); isoDay(d) <= last; d.setUTCDate(d.getUTCDate() + 1)) {
    days.push(isoDay(d));
  }
  return days;
}

function sumBy(rows, field) {
  const sums = new Map();
  for (const row of rows) {
    const name = row[field] ?? "–";
    const sum = sums.get(name) || {predictions: 0, cost: 0};
    sum.predictions += row.predictions;
    sum.cost += row.cost_usd;
    sums.set(name, sum);
  }
  return [...sums.entries()].sort((a, b) => b[1].cost - a[1].cost);
}

function chart(rows, split, from, to) {
  const days = daysBetween(from, to);
  const series = sumBy(rows, split).map(([name]) => name);
  const perDay = new Map(days.map((day) => [day, new Map()]));
  for (const row of rows) {
    const day = perDay.get(row.day);
    if (day) day.set(row[split] ?? "–", (day.get(row[split] ?? "–") || 0) + row.cost_usd);
  }
  const top = Math.max(0.01, ...[...perDay.values()].map((d) => [...d.values()].reduce((a, b) => a + b, 0)));
  // Drawn at the box's own width: labels keep their size on a phone.
  const width = Math.max(300, document.getElementById("usage-chart").clientWidth || 720);
  const height = 260, left = 56, bottom = 28, plot = height - bottom - 8;
  const step = (width - left) / Math.max(days.length, 1);
  const root = svg("svg", {viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img",
                           "aria-label": `Spend per day by ${split}, ${from} to ${to}`});
  for (const fraction of [0, 0.5, 1]) {
    const y = 8 + plot * (1 - fraction);
    root.append(svg("line", {x1: left, x2: width, y1: y, y2: y, class: "axis"}),
                svg("text", {x: left - 6, y: y + 4, "text-anchor": "end"}, money(top * fraction)));
  }
  days.forEach((day, i) => {
    let y = 8 + plot;
    for (const [name, cost] of perDay.get(day)) {
      const h = plot * cost / top;
      y -= h;
      const bar = svg("rect", {x: left + i * step + step * 0.15, y, width: step * 0.7, height: h,
                               class: "bar s" + (series.indexOf(name) % SERIES_CLASSES)});
      bar.append(svg("title", {}, `${day} · ${name}: ${money(cost)}`));
      root.append(bar);
    }
    if (i % Math.ceil(days.length / Math.floor(width / 48)) === 0) {
      root.append(svg("text", {x: left + i * step + step / 2, y: height - 8, "text-anchor": "middle"},
                      day.slice(5)));
    }
  });
  return [root, legendOf(series)];
}

function legendOf(series) {
  return series.map((name, i) => {
    const entry = el("li");
    entry.append(el("span", {class: "swatch s" + (i % SERIES_CLASSES), "aria-hidden": "true"}), name);
    return entry;
  });
}

function fillTable(id, sums) {
  document.querySelector(id + " tbody").replaceChildren(...sums.map(([name, sum]) => {
    const row = el("tr");
    row.append(el("td", {}, name), el("td", {}, sum.predictions), el("td", {}, money(sum.cost)));
    return row;
  }));
}

async function showUsage(event) {
  if (event) event.preventDefault();
  const from = document.getElementById("usage-from").value;
  const to = document.getElementById("usage-to").value;
  const split = document.getElementById("usage-split").value;
  try {
    const data = await api("GET", "usage?group_by=key,model,day&from=" + from + "&to=" + to);
    const [drawing, legend] = chart(data.data, split, from, to);
    document.getElementById("usage-chart").replaceChildren(drawing);
    document.getElementById("usage-legend").replaceChildren(...legend);
    document.getElementById("usage-total").textContent = "Total " + money(data.total_cost_usd) +
      " over " + data.data.reduce((n, row) => n + row.predictions, 0) + " predictions.";
    fillTable("#usage-by-key", sumBy(data.data, "key"));
    fillTable("#usage-by-model", sumBy(data.data, "model"));
    document.getElementById("usage-message").textContent = "";
  } catch (error) {
    document.getElementById("usage-message").textContent = error.message;
  }
}

const today = new Date();
document.getElementById("usage-to").value = isoDay(today);
document.getElementById("usage-from").value = isoDay(new Date(today.getTime() - 13 * 86400000));
document.getElementById("usage-range").addEventListener("submit", showUsage);
document.getElementById("usage-split").addEventListener("change", () => showUsage());
showUsage();
