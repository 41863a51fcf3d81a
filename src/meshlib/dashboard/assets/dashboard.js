// meshlib dashboard: polls /api/mesh and redraws the page. Hand-written, no libraries.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const FAILING = 0.05; // an edge with more than 5% errors is drawn red

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(value, digits, unit) {
  return value === null || value === undefined ? "–" : value.toFixed(digits) + unit;
}

// Columns by depth: callers left, callees right.
function layout(nodes, edges) {
  const depth = new Map(nodes.map((n) => [n.name, 0]));
  for (let round = 0; round < nodes.length; round++) {
    for (const e of edges) {
      const d = (depth.get(e.source || "(client)") || 0) + 1;
      if (d > (depth.get(e.target) || 0) && d < nodes.length + 1) depth.set(e.target, d);
    }
  }
  const columns = new Map();
  for (const n of nodes) {
    const d = depth.get(n.name);
    if (!columns.has(d)) columns.set(d, []);
    columns.get(d).push(n.name);
  }
  const where = new Map();
  for (const [d, names] of columns) {
    names.forEach((name, i) => where.set(name, { x: 110 + d * 320, y: 60 + i * 110 }));
  }
  const rows = Math.max(1, ...[...columns.values()].map((c) => c.length));
  return { where, height: 40 + rows * 110, width: 220 + columns.size * 320 };
}

function drawGraph(data) {
  const svg = document.getElementById("graph");
  svg.replaceChildren();
  const { where, height, width } = layout(data.nodes, data.edges);
  svg.setAttribute("height", String(height));
  svg.setAttribute("viewBox", `0 0 ${Math.max(width, 600)} ${height}`);
  const defs = el("svg:defs");
  const marker = el("svg:marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
    markerWidth: 6, markerHeight: 6, orient: "auto-start-reverse" });
  marker.append(el("svg:path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#6b7a90" }));
  defs.append(marker);
  svg.append(defs);
  for (const e of data.edges) {
    const a = where.get(e.source || "(client)");
    const b = where.get(e.target);
    if (!a || !b) continue;
    const failing = (e.error_rate || 0) > FAILING;
    const g = el("svg:g", {
      class: failing ? "edge failing" : "edge",
      "data-source": e.source, "data-target": e.target,
      "data-rps": e.rps, "data-error-rate": e.error_rate, "data-p99-ms": e.p99_ms,
      "data-total": e.total, "data-errors": e.errors,
    });
    g.append(el("svg:path", { d: `M ${a.x + 95} ${a.y} L ${b.x - 95} ${b.y}`,
      "marker-end": "url(#arrow)" }));
    const mx = (a.x + b.x) / 2, my = (a.y + b.y) / 2;
    g.append(el("svg:text", { x: mx, y: my - 22, "text-anchor": "middle", class: "rps" },
      fmt(e.rps, 1, " req/s")));
    g.append(el("svg:text", { x: mx, y: my - 8, "text-anchor": "middle", class: "errors" },
      fmt(e.error_rate === null ? null : e.error_rate * 100, 1, "% errors")));
    g.append(el("svg:text", { x: mx, y: my + 18, "text-anchor": "middle", class: "p99" },
      "p99 " + fmt(e.p99_ms, 0, " ms")));
    g.append(el("svg:title", {}, `${e.source} → ${e.target}: ${e.total ?? "?"} requests, ` +
      `${e.errors ?? "?"} errors`));
    svg.append(g);
  }
  for (const n of data.nodes) {
    const p = where.get(n.name);
    const down = n.processes.length > 0 && n.up < n.processes.length;
    const g = el("svg:g", { class: down ? "node down" : "node", "data-name": n.name,
      "data-up": n.up, "data-processes": n.processes.length });
    g.append(el("svg:rect", { x: p.x - 95, y: p.y - 24, width: 190, height: 48, rx: 8 }));
    g.append(el("svg:text", { x: p.x, y: p.y - 2, "text-anchor": "middle" }, n.name));
    const sub = n.processes.length ? `${n.up}/${n.processes.length} up` : "not scraped";
    g.append(el("svg:text", { x: p.x, y: p.y + 16, "text-anchor": "middle", class: "meta" },
      sub + (n.tls ? ` · TLS ${n.tls}` : "")));
    svg.append(g);
  }
}

function expiry(node) {
  if (node.certificate_expires_in_s === null) return "no certificate";
  const s = node.certificate_expires_in_s;
  const shown = s > 86400 ? `${(s / 86400).toFixed(1)} d` : s > 3600
    ? `${(s / 3600).toFixed(1)} h` : `${Math.round(s / 60)} min`;
  return `certificate expires in ${shown}`;
}

function drawServices(data) {
  const box = document.getElementById("services");
  box.replaceChildren();
  for (const n of data.nodes) {
    const service = data.services[n.name] || { instances: [], breakers: {} };
    const div = el("div", { class: "service", "data-service": n.name });
    const h = el("h3", {}, n.name);
    const breakers = Object.entries(service.breakers)
      .map(([caller, state]) => `${caller}: ${state}`).join(", ");
    h.append(el("span", { class: "meta" }, `TLS ${n.tls || "unknown"} · ${expiry(n)}` +
      (breakers ? ` · breaker (${breakers})` : "")));
    div.append(h);
    const table = el("table");
    const head = el("tr");
    for (const t of ["instance", "version", "state", "in flight", "latency", "ejections",
      "seen by"]) head.append(el("th", {}, t));
    table.append(head);
    for (const i of service.instances) {
      const state = !i.healthy ? "unhealthy" : i.ejected
        ? `ejected (${i.ejected_for_s.toFixed(1)} s)` : "ok";
      const tr = el("tr", { class: !i.healthy ? "unhealthy" : i.ejected ? "ejected" : "ok",
        "data-address": i.address, "data-state": i.ejected ? "ejected" : i.healthy ? "ok"
          : "unhealthy" });
      for (const cell of [i.address, i.version || "–", state, String(i.in_flight),
        fmt(i.latency_ms, 1, " ms"), String(i.ejections), i.seen_by.join(", ")]) {
        tr.append(el("td", {}, cell));
      }
      table.append(tr);
    }
    if (!service.instances.length) {
      const tr = el("tr");
      tr.append(el("td", { colspan: 7, class: "quiet" }, "no caller reports this service"));
      table.append(tr);
    }
    div.append(table);
    box.append(div);
  }
}

function drawRollouts(data) {
  const box = document.getElementById("rollouts");
  box.replaceChildren();
  if (!data.rollouts || !data.rollouts.length) {
    box.append(el("p", { class: "quiet" }, "none"));
    return;
  }
  const table = el("table");
  const head = el("tr");
  for (const t of ["service", "mode", "phase", "weights", "checks", "last check", "verdict"]) {
    head.append(el("th", {}, t));
  }
  table.append(head);
  for (const r of data.rollouts) {
    const m = r.metrics;
    const last = !m ? "–" : m.error ? m.error : `${Math.round(m.requests)} requests, ` +
      `${fmt(m.success_rate, 2, "%")} ok, p99 ${fmt(m.p99_seconds === null ? null
        : m.p99_seconds * 1000, 0, " ms")}`;
    const tr = el("tr", { "data-rollout": r.service, "data-phase": r.phase });
    for (const cell of [r.service, r.mode, r.phase,
      `${r.stable} ${100 - r.weight}% / ${r.canary} ${r.weight}%`,
      `${r.step} passed, ${r.failed_checks}/${r.threshold} failed, ` +
      `${r.inconclusive_checks}/${r.threshold} inconclusive`, last]) {
      tr.append(el("td", {}, cell));
    }
    tr.append(el("td", { class: r.verdict ? `verdict-${r.verdict.startsWith("pass") ? "pass"
      : "fail"}` : "" }, r.verdict || "–"));
    table.append(tr);
  }
  box.append(table);
}

let polls = 0;
async function refresh() {
  let interval = 2;
  try {
    const response = await fetch("api/mesh", { cache: "no-store" });
    const data = await response.json();
    interval = data.interval_s || interval;
    if (data.time) {
      drawGraph(data);
      drawServices(data);
      drawRollouts(data);
      polls += 1;
      const updated = document.getElementById("updated");
      updated.textContent = `updated ${new Date(data.time * 1000).toLocaleTimeString()} ` +
        `from ${data.source === "prometheus" ? "Prometheus" : "the admin listeners"}`;
      updated.dataset.polls = String(polls);
      updated.dataset.time = String(data.time);
    }
    document.getElementById("problems").textContent = (data.errors || []).join("; ");
  } catch (err) {
    document.getElementById("problems").textContent = `cannot read api/mesh: ${err}`;
  }
  setTimeout(refresh, interval * 1000);
}

refresh();
