// diktyo dashboard: service graph, golden metrics, traces, resilience, config.
// Talks only to the control plane's JSON API under api/ (see diktyo/dashboard/server.py), and
// to its v1/workloads for the local platform's restart counts (absent elsewhere: ignored).
"use strict";

const POLL_MS = 2000;
const state = { tab: "graph", cy: null, selected: null, charts: {}, services: [], live: false };

function $(sel) { return document.querySelector(sel); }
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
async function api(path) {
  const r = await fetch("api/" + path, { cache: "no-store" });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}
function fmt(n, digits = 1) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  return Number(n).toFixed(digits);
}
function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %"; }
function healthClass(errRate) { return errRate > 0.1 ? "bad" : errRate > 0.01 ? "warn" : "ok"; }
function setStatus(ok, text) {
  const s = $("#status");
  s.className = "status " + (ok ? "live" : "down");
  s.textContent = text;
}

// ---------------------------------------------------------------- tabs
function showTab(name) {
  state.tab = name;
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.dataset.tab === name));
  document.querySelectorAll(".tab").forEach(t => t.classList.toggle("active", t.id === "tab-" + name));
  if (name === "graph" && state.cy) state.cy.resize();
  refresh();
}
window.addEventListener("hashchange", () => showTab((location.hash || "#graph").slice(1)));

// ---------------------------------------------------------------- graph
const COLORS = { ok: "#22c55e", warn: "#f59e0b", bad: "#ef4444", idle: "#475569" };

function initGraph() {
  state.cy = cytoscape({
    container: $("#graph"),
    wheelSensitivity: 0.3,
    style: [
      { selector: "node", style: {
          "background-color": "#1e3a8a", "border-color": "#38bdf8", "border-width": 2,
          "label": "data(label)", "color": "#e2e8f0", "font-size": 11, "text-valign": "bottom",
          "text-margin-y": 6, "width": 34, "height": 34, "shape": "round-rectangle" } },
      { selector: "node[kind = 'service']", style: { "shape": "triangle", "background-color": "#0e7490" } },
      { selector: "node[kind = 'unknown']", style: { "shape": "diamond", "background-color": "#475569" } },
      { selector: "node[kind = 'external']", style: { "shape": "hexagon", "background-color": "#7c3aed" } },
      { selector: "node[kind = 'app']", style: {
          "background-opacity": 0.08, "border-style": "dashed", "border-color": "#64748b",
          "text-valign": "top", "text-margin-y": -4, "shape": "round-rectangle", "padding": 14 } },
      { selector: "node[?unhealthy]", style: { "border-color": "#ef4444", "border-width": 3 } },
      { selector: "edge", style: {
          "curve-style": "bezier", "target-arrow-shape": "triangle", "width": "data(width)",
          "line-color": "data(color)", "target-arrow-color": "data(color)",
          "label": "data(label)", "font-size": 9, "color": "#cbd5e1",
          "text-background-color": "#0f172a", "text-background-opacity": 0.8,
          "text-background-padding": 2, "text-rotation": "autorotate" } },
      { selector: ":selected", style: { "border-color": "#fde047", "line-color": "#fde047", "target-arrow-color": "#fde047" } },
    ],
    layout: { name: "breadthfirst", directed: true, padding: 30 },
  });
  state.cy.on("tap", "node, edge", ev => { state.selected = ev.target.id(); showSelection(); });
  state.cy.on("tap", ev => { if (ev.target === state.cy) { state.selected = null; showSelection(); } });
}

function graphElements(g, view) {
  const els = [];
  const apps = new Set();
  for (const n of g.nodes) {
    const data = {
      id: n.id, label: view === "app" ? (n.version && n.version !== "unknown" ? n.version : n.app || n.id) : (n.workload || n.id),
      kind: n.kind || "workload", unhealthy: !!n.unhealthy, info: n,
    };
    if (view === "app" && n.app && n.kind !== "service" && n.kind !== "external" && n.kind !== "unknown") {
      data.parent = "app:" + n.app;
      apps.add(n.app);
    }
    els.push({ group: "nodes", data });
  }
  for (const a of apps) els.push({ group: "nodes", data: { id: "app:" + a, label: a, kind: "app" } });
  for (const e of g.edges) {
    const err = e.error_rate || 0;
    const cls = e.rps > 0 ? healthClass(err) : "idle";
    const label = (e.mtls ? "mTLS · " : "") + fmt(e.rps, 2) + " rps" + (err > 0 ? " · " + pct(err) + " err" : "");
    els.push({ group: "edges", data: {
      id: e.source + "->" + e.target, source: e.source, target: e.target, label,
      color: COLORS[cls], width: Math.min(6, 1.5 + Math.log10(1 + (e.rps || 0)) * 2), info: e,
    } });
  }
  return els;
}

async function refreshGraph() {
  const view = $("#graph-view").value;
  const win = $("#graph-window").value;
  const g = await api(`graph?window=${win}`);
  fetch("v1/workloads", { cache: "no-store" }).then(r => r.ok ? r.json() : { workloads: [] })
    .then(w => { state.workloads = w.workloads || []; }).catch(() => { state.workloads = []; });
  const els = graphElements(g, view);
  const cy = state.cy;
  const want = new Set(els.map(e => e.data.id));
  let structural = false;
  cy.batch(() => {
    cy.elements().forEach(x => { if (!want.has(x.id())) { x.remove(); structural = true; } });
    for (const e of els.filter(x => x.group === "nodes")) {
      const cur = cy.getElementById(e.data.id);
      if (cur.empty()) { cy.add(e); structural = true; }
      else if ((cur.data("parent") || null) !== (e.data.parent || null)) { cur.remove(); cy.add(e); structural = true; }
      else cur.data(e.data);
    }
    for (const e of els.filter(x => x.group === "edges")) {
      const cur = cy.getElementById(e.data.id);
      if (cur.empty()) { cy.add(e); structural = true; } else cur.data(e.data);
    }
  });
  if (structural) cy.layout({ name: "breadthfirst", directed: true, padding: 30, spacingFactor: 1.2 }).run();
  $("#graph").dataset.nodes = String(g.nodes.length);
  $("#graph").dataset.edges = String(g.edges.length);
  showSelection();
}

function showSelection() {
  const side = $("#graph-side");
  const sel = state.selected && state.cy.getElementById(state.selected);
  if (!sel || sel.empty()) {
    side.replaceChildren(el("h3", {}, "Select a node or an edge"),
      el("p", { class: "muted" }, "Request rate, success rate and p99 over the window appear here."));
    return;
  }
  const info = sel.data("info") || {};
  if (sel.isEdge()) {
    side.replaceChildren(
      el("h3", {}, `${info.source} → ${info.target}`),
      kv([["requests/s", fmt(info.rps, 2)], ["success rate", pct(1 - (info.error_rate || 0))],
          ["p50", fmt(info.p50_ms) + " ms"], ["p99", fmt(info.p99_ms) + " ms"],
          ["mTLS", info.mtls ? "yes (mutual TLS)" : "no"], ["response codes", codes(info.codes)]]),
      el("button", { id: "edge-charts", onclick: () => {
        const src = state.cy.getElementById(info.source).data("info") || {};
        state.edge = { service: info.service, source: src.workload || "", label: `${src.workload || info.source} → ${info.service}` };
        state.charts = {};
        location.hash = "#metrics";
      } }, "Charts for this edge"));
  } else {
    side.replaceChildren(
      el("h3", {}, info.workload || info.app || sel.id()),
      kv([["app", info.app || "–"], ["version", info.version || "–"], ["namespace", info.namespace || "–"],
          ["inbound rps", fmt(info.rps_in, 2)], ["error rate", pct(info.error_rate_in)],
          ["p99", fmt(info.p99_ms) + " ms"], ...restartRows(info)]));
  }
}
function restartRows(info) {  // the local platform's replicas of this workload (v1/workloads)
  const reps = (state.workloads || []).filter(w => w.workload === info.workload && (!info.namespace || w.namespace === info.namespace));
  if (!reps.length) return [];
  const last = reps.map(w => w.last_exit).filter(Boolean).sort((a, b) => b.finished_at - a.finished_at)[0];
  return [["address", reps.map(w => w.address || "127.0.0.1").join(", ")],
          ["capture", [...new Set(reps.map(w => w.capture || "proxy"))].join(", ")],
          ["restarts", String(reps.reduce((n, w) => n + (w.restarts || 0), 0))],
          ["last exit", last ? `${last.container}: ${last.reason} (${last.exit_code})` : "–"]];
}
function kv(rows) {
  const dl = el("dl", { class: "kv" });
  for (const [k, v] of rows) dl.append(el("dt", {}, k), el("dd", {}, v));
  return dl;
}
function codes(c) {
  if (!c) return "–";
  return Object.entries(c).map(([k, v]) => `${k}: ${fmt(v, 2)}/s`).join(", ");
}

// ---------------------------------------------------------------- metrics
function makeChart(id, series, data) {
  const node = $(id);
  const width = Math.max(360, node.clientWidth || 420);
  if (state.charts[id]) { state.charts[id].setData(data); return; }
  node.replaceChildren();
  state.charts[id] = new uPlot({
    width, height: 220, series: [{}].concat(series),
    axes: [{ stroke: "#8da2c0", grid: { stroke: "#24365e" } }, { stroke: "#8da2c0", grid: { stroke: "#24365e" } }],
  }, data, node);
}

async function refreshMetrics() {
  const sel = $("#metrics-service");
  const svcs = await api("services");
  const names = svcs.map(s => s.name);
  if (names.join() !== state.services.join()) {
    const keep = sel.value;
    state.services = names;
    sel.replaceChildren(...names.map(n => el("option", { value: n }, n)));
    if (names.includes(keep)) sel.value = keep;
    const ts = $("#traces-service");
    const keepT = ts.value;
    ts.replaceChildren(el("option", { value: "" }, "any"), ...names.map(n => el("option", { value: n }, n)));
    ts.value = keepT;
  }
  const edge = state.edge;
  if (edge && state.services.includes(edge.service)) sel.value = edge.service;
  $("#metrics-edge").replaceChildren(...(edge ? [
    el("span", {}, "edge " + edge.label + " "),
    el("button", { onclick: () => { state.edge = null; state.charts = {}; refresh(); } }, "show the whole service")] : []));
  const service = edge ? edge.service : sel.value;
  if (!service) return;
  const q = `service=${encodeURIComponent(service)}&window=${$("#metrics-window").value}` +
            (edge && edge.source ? `&source=${encodeURIComponent(edge.source)}` : "");
  const s = await api("series?" + q);
  makeChart("#chart-rps", [{ label: "rps", stroke: "#38bdf8", width: 2 }], [s.t, s.rps]);
  makeChart("#chart-success", [{ label: "success %", stroke: "#22c55e", width: 2 }], [s.t, s.success_rate.map(x => x === null ? null : 100 * x)]);
  makeChart("#chart-latency", [
    { label: "p50", stroke: "#22c55e", width: 2 }, { label: "p95", stroke: "#f59e0b", width: 2 },
    { label: "p99", stroke: "#ef4444", width: 2 }], [s.t, s.p50, s.p95, s.p99]);
  $("#tab-metrics").dataset.points = String(s.t.length);
}

// ---------------------------------------------------------------- traces
async function refreshTraces() {
  const q = new URLSearchParams({ service: $("#traces-service").value, min_ms: $("#traces-min").value || "0",
                                  errors: $("#traces-errors").checked ? "1" : "0", limit: "50" });
  const list = await api("traces?" + q);
  const tb = $("#traces-table tbody");
  tb.replaceChildren(...list.map(t => {
    const tr = el("tr", { class: "clickable" + (t.error ? " err" : ""), "data-trace": t.trace_id },
      el("td", {}, new Date(t.start_ms).toLocaleTimeString()),
      el("td", {}, `${t.root_service}: ${t.root_name}`),
      el("td", {}, t.spans),
      el("td", {}, fmt(t.duration_ms, 2) + " ms"),
      el("td", { class: "muted" }, t.trace_id.slice(0, 16) + "…"));
    tr.addEventListener("click", () => openTrace(t.trace_id));
    return tr;
  }));
}

async function openTrace(id) {
  const t = await api("traces/" + id);
  const view = $("#trace-view");
  view.classList.remove("hidden");
  const spans = t.spans.slice().sort((a, b) => a.start_ms - b.start_ms);
  const t0 = Math.min(...spans.map(s => s.start_ms));
  const t1 = Math.max(...spans.map(s => s.start_ms + s.duration_ms));
  const total = Math.max(t1 - t0, 0.001);
  const depth = {};
  const byId = Object.fromEntries(spans.map(s => [s.span_id, s]));
  const d = s => (s.span_id in depth) ? depth[s.span_id]
    : (depth[s.span_id] = (s.parent_id && byId[s.parent_id] && byId[s.parent_id] !== s) ? d(byId[s.parent_id]) + 1 : 0);
  const rows = spans.map(s => {
    const left = 100 * (s.start_ms - t0) / total, width = Math.max(0.3, 100 * s.duration_ms / total);
    const bar = el("div", { class: "bar" + (s.error ? " error" : ""), style: `left:${left}%;width:${width}%` });
    return el("div", { class: "row span" },
      el("div", { class: "name", style: `padding-left:${12 * d(s)}px`, title: JSON.stringify(s.attributes || {}) },
        `${s.service} · ${s.name}`),
      el("div", { class: "bar-track" }, bar),
      el("div", { class: "muted" }, fmt(s.duration_ms, 2) + " ms"));
  });
  view.replaceChildren(el("h3", {}, `Trace ${id} · ${spans.length} spans · ${fmt(total, 2)} ms`),
                       el("div", { class: "waterfall" }, ...rows));
}

// ---------------------------------------------------------------- resilience
function meter(label, used, max) {
  const unlimited = !max || max >= 4294967295;
  const ratio = unlimited ? 0 : Math.min(1, used / max);
  const cls = ratio >= 1 ? "bad" : ratio > 0.7 ? "warn" : "";
  return el("div", { class: "meter" },
    el("div", { class: "label" }, el("span", {}, label), el("span", {}, unlimited ? `${used} / ∞` : `${used} / ${max}`)),
    el("div", { class: "track" }, el("div", { class: "fill " + cls, style: `width:${100 * ratio}%` })));
}
async function refreshResilience() {
  const list = await api("resilience");
  const box = $("#resilience");
  if (!list.length) { box.replaceChildren(el("p", { class: "muted" }, "No destinations yet.")); return; }
  box.replaceChildren(...list.map(c => {
    const b = c.breaker || {};
    const hosts = (c.hosts || []).map(h => el("span", { class: "pill" + (h.ejected ? " ejected" : "") },
      `${h.address}${h.ejected ? " ejected" : ""}${h.active ? " · " + h.active + " active" : ""}`));
    const ov = Object.entries(c.overflows || {}).filter(([, v]) => v > 0).map(([k, v]) => `${k}=${v}`).join(" ");
    return el("div", { class: "card resilience-card" },
      el("h3", {}, `${c.workload} → ${c.cluster}`),
      meter("connections", b.connections || 0, b.max_connections),
      meter("pending requests", b.pending || 0, b.max_pending),
      meter("active requests", b.requests || 0, b.max_requests),
      meter("retries in flight", b.retries || 0, b.max_retries),
      el("div", { class: "muted" }, ov ? "overflows: " + ov : "no overflows"),
      el("div", {}, ...hosts));
  }));
}

// ---------------------------------------------------------------- config
async function refreshConfig() {
  const cfg = await api("config");
  const cp = cfg.control_plane;
  if (cp) {
    const reps = (cp.replicas || []).map(r => r.id + (r.leader ? " (leader)" : "")).join(", ");
    $("#config-replicas").textContent =
      `control plane: ${cp.backend} store · replicas: ${reps || "none"} · this page from ${cp.replica}` +
      (cp.etcd_reachable === false ? " · etcd unreachable (no quorum?)" : "");
  }
  const msgs = cfg.messages || [];
  $("#config-messages").replaceChildren(...msgs.map(m =>
    el("div", { class: "msg " + m.severity }, `${m.file}:${m.line}:${m.column}: ${m.severity}: ${m.message}`)));
  const byFile = {};
  for (const m of msgs) (byFile[m.file] = byFile[m.file] || []).push(m);
  $("#config-table tbody").replaceChildren(...cfg.resources.map(r => {
    const mine = (byFile[r.file] || []).filter(m => !r.end_line || (m.line >= r.line && m.line <= r.end_line));
    return el("tr", {},
      el("td", {}, r.kind), el("td", {}, r.name), el("td", {}, r.namespace),
      el("td", { class: "muted" }, `${r.file}:${r.line}`),
      el("td", { class: mine.some(m => m.severity === "error") ? "err" : mine.length ? "warnc" : "okc" },
        mine.length ? mine.map(m => m.message).join("; ") : "✓ no issues"));
  }));
}

// ---------------------------------------------------------------- loop
async function refresh() {
  try {
    if (state.tab === "graph") await refreshGraph();
    else if (state.tab === "metrics") await refreshMetrics();
    else if (state.tab === "traces") await refreshTraces();
    else if (state.tab === "resilience") await refreshResilience();
    else if (state.tab === "config") await refreshConfig();
    setStatus(true, "live · " + new Date().toLocaleTimeString());
  } catch (err) {
    setStatus(false, "control plane unreachable: " + err.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  initGraph();
  $("#graph-view").addEventListener("change", () => { state.cy.elements().remove(); refresh(); });
  $("#graph-window").addEventListener("change", refresh);
  $("#metrics-service").addEventListener("change", () => { state.edge = null; state.charts = {}; refresh(); });
  $("#metrics-window").addEventListener("change", refresh);
  $("#traces-refresh").addEventListener("click", refresh);
  showTab((location.hash || "#graph").slice(1));
  setInterval(() => { if (state.tab !== "traces") refresh(); }, POLL_MS);
  api("services").then(s => { state.services = []; }).catch(() => {});
});
