// The PgQ page: reads api/movers (same origin, the UI's session cookie) and draws the
// table and one plot per mover. Text goes in through textContent only: DAG ids, queue
// and consumer names come from DAG authors.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child === null || child === undefined ? "" : String(child)));
  }
  return node;
}

function fmt(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number" && !Number.isInteger(value)) return value.toFixed(1);
  if (typeof value === "boolean") return value ? "yes" : "no";
  return String(value);
}

function side(s) {
  const where = s.host !== undefined ? `${s.host}:${s.port}/${s.database}` : "";
  return el("span", {}, `${s.conn_id} · ${s.queue}`, el("br"), el("span", { class: "muted" }, where));
}

function cell(cls, value, numeric) {
  return el("td", { class: (numeric ? "num " : "") + cls }, fmt(value));
}

// The open batch, and how long PgQ has not seen its consumer since it took it (the
// "stuck" rule's clock).
function openBatch(m) {
  const td = cell("current-batch", m.current_batch, true);
  if (m.current_batch !== null && typeof m.last_seen_seconds === "number") {
    td.append(el("div", { class: "muted open-for" }, `open ${fmt(m.last_seen_seconds)} s`));
  }
  return td;
}

function stateClass(state) {
  return "state-" + state.replace(/ /g, "-");
}

// Inside the UI's frame (sandboxed without top navigation) a link cannot load the top
// page; the frame is same-origin, so it moves the UI's router there instead.
function openInAirflow(event) {
  if (window.top === window) return;
  try {
    window.top.history.pushState({}, "", this.href);
    window.top.dispatchEvent(new PopStateEvent("popstate", { state: {} }));
    event.preventDefault();
  } catch (e) {
    // not reachable from here: the link opens in the frame
  }
}

function row(m) {
  const last = m.runs && m.runs.length ? m.runs[m.runs.length - 1] : null;
  const lastRun = last ? `${last.state || "?"}: ${fmt(last.events)} events, ${fmt(last.batches)} batches` : "–";
  const dagLink = el("a", { href: m.grid_url, class: "grid-link" }, m.dag_id);
  dagLink.addEventListener("click", openInAirflow);
  const what = el("td", { class: "task" }, dagLink, " / ", m.task_id + (m.map_index >= 0 ? `[${m.map_index}]` : ""));
  if (m.rendered_from) what.append(el("div", { class: "muted" }, `values as run ${m.rendered_from} rendered them`));
  if (m.errors.length) what.append(el("div", { class: "row-errors" }, m.errors.join("; ")));
  const consumer = m.consumer_name + (m.subconsumer ? ` / ${m.subconsumer}` : "");
  return el("tr", { id: m.key, "data-key": m.key, "data-state": m.state },
    el("td", { class: "state" }, el("span", { class: "badge " + stateClass(m.state) }, m.state)),
    what,
    el("td", { class: "source" }, side(m.source)),
    el("td", { class: "target" }, side(m.target)),
    el("td", { class: "consumer" }, consumer),
    cell("registered", m.registered),
    cell("last-tick", m.last_tick, true),
    openBatch(m),
    cell("newest-tick", m.newest_tick, true),
    cell("target-mark", m.target_mark, true),
    cell("marks-agree", m.marks_agree),
    cell("lag", m.lag_seconds, true),
    cell("pending", m.pending_events, true),
    el("td", { class: "last-run" }, lastRun));
}

function plot(m) {
  const box = el("div", { class: "plot", "data-key": m.key }, el("h3", {}, m.key), el("div", { class: "muted" }, "events per run (bars), lag in s at the run's end (line)"));
  const runs = m.runs || [];
  if (!runs.length) {
    box.append(el("p", { class: "muted" }, m.runs === null ? "run reports hidden (no XCom access)" : "no runs yet"));
    return box;
  }
  const w = 320, h = 110, pad = 4;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h + 10}`);
  const maxEvents = Math.max(1, ...runs.map(r => r.events || 0));
  const lags = runs.map(r => r.lag_seconds).filter(v => typeof v === "number");
  const maxLag = Math.max(1, ...lags);
  const step = (w - 2 * pad) / runs.length;
  const points = [];
  runs.forEach((r, i) => {
    // a failed run moved nothing it reports: a short red bar still marks it
    const bh = Math.max(r.state === "success" ? 0 : 4, ((r.events || 0) / maxEvents) * h);
    const bar = document.createElementNS(SVG, "rect");
    bar.setAttribute("x", pad + i * step + 1);
    bar.setAttribute("y", h - bh);
    bar.setAttribute("width", Math.max(1, step - 2));
    bar.setAttribute("height", bh);
    bar.setAttribute("fill", r.state === "success" ? "#63b3ed" : "#fc8181");
    const tip = document.createElementNS(SVG, "title");
    tip.textContent = `${r.run_id}: ${r.state}, ${fmt(r.events)} events, lag ${fmt(r.lag_seconds)} s`;
    bar.append(tip);
    svg.append(bar);
    if (typeof r.lag_seconds === "number") points.push(`${pad + i * step + step / 2},${h - (r.lag_seconds / maxLag) * h}`);
  });
  if (points.length > 1) {
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", "#dd6b20");
    line.setAttribute("stroke-width", "2");
    svg.append(line);
  }
  const label = document.createElementNS(SVG, "text");
  label.setAttribute("x", pad);
  label.setAttribute("y", h + 9);
  label.setAttribute("font-size", "8");
  label.textContent = `max ${maxEvents} events, max lag ${fmt(maxLag)} s, last ${runs.length} runs`;
  svg.append(label);
  box.append(svg);
  return box;
}

async function load() {
  const runs = document.getElementById("runs").value;
  const error = document.getElementById("page-error");
  let data;
  try {
    const response = await fetch(`api/movers?runs=${encodeURIComponent(runs)}`, { credentials: "same-origin" });
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    data = await response.json();
  } catch (e) {
    error.textContent = `could not load the movers: ${e.message}`;
    error.hidden = false;
    return;
  }
  error.hidden = true;
  const rules = document.getElementById("rule-list");
  rules.replaceChildren(...Object.entries(data.rules).flatMap(([state, rule]) =>
    [el("dt", {}, el("span", { class: "badge " + stateClass(state) }, state)), el("dd", {}, rule)]));
  document.querySelector("#movers tbody").replaceChildren(...data.movers.map(row));
  document.getElementById("plots").replaceChildren(...data.movers.map(plot));
  document.getElementById("empty").hidden = data.movers.length > 0;
  document.getElementById("updated").textContent = `read ${new Date(data.generated_at).toLocaleTimeString()}`;
  const wanted = new URLSearchParams(window.location.search).get("mover");
  if (wanted) {
    const target = document.getElementById(wanted);
    if (target) {
      target.classList.add("highlight");
      target.scrollIntoView({ block: "center" });
    }
  }
  document.body.dataset.loaded = "true";
}

document.getElementById("reload").addEventListener("click", load);
document.getElementById("runs").addEventListener("change", load);
load();
setInterval(load, 30000);
