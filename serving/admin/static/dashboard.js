// AlignedServe admin page: live state over server-sent events, charts drawn as inline SVG.
//
// No chart library: the site may have no internet (no CDN), and the five charts here are a
// histogram and line charts, a few dozen lines of SVG each, so a vendored library would be more
// code to ship and audit than it saves. Data: /api/timeseries once at load, then /api/events
// (one update a second: the state, the newest requests for the table, both from one snapshot so
// the counts and the table agree, and the newest time-series point); the GPU panel polls
// /api/gpus every five seconds; the policy list
// comes from /api/policies (the policy registry) once at load.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const WINDOW_S = 300;          // time-series charts show the last five minutes
const points = [];             // time-series points, oldest first
let lastState = null;

function el(tag, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function fmt(x, digits = 1) {
  if (x === null || x === undefined || Number.isNaN(x)) return "-";
  if (Math.abs(x) >= 1e6) return (x / 1e6).toFixed(digits) + "M";
  if (Math.abs(x) >= 1e3) return (x / 1e3).toFixed(digits) + "k";
  return Number(x).toFixed(digits);
}

// ---- charts ---------------------------------------------------------------------------------

function histogram(container, hist, runningSpan, stagedSpan) {
  const W = 900, H = 220, L = 40, B = 24, T = 8;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "KV length histogram" });
  const bins = (hist && hist.bins) || [];
  const width = (hist && hist.bin_width) || 1;
  const kinds = ["parked", "running", "staged", "other"];
  const top = Math.max(1, ...bins.map(b => kinds.reduce((s, k) => s + (b[k] || 0), 0)));
  const maxLen = bins.length ? bins[bins.length - 1].lo + width : 1;
  const x = v => L + (W - L - 8) * v / maxLen;
  const y = v => H - B - (H - B - T) * v / top;
  for (const [span, cls] of [[runningSpan, "running"], [stagedSpan, "staged"]]) {
    if (span) el("rect", { class: `span ${cls}`, x: x(span[0]), y: T, width: Math.max(2, x(span[1]) - x(span[0])), height: H - B - T }, svg);
  }
  for (const b of bins) {
    let base = 0;
    for (const k of kinds) {
      const n = b[k] || 0;
      if (!n) continue;
      el("rect", { class: `bar ${k}`, x: x(b.lo) + 1, width: Math.max(1, x(b.lo + width) - x(b.lo) - 2), y: y(base + n), height: y(base) - y(base + n) }, svg)
        .appendChild(el("title")).textContent = `${k}: ${n} requests with KV ${b.lo}-${b.lo + width}`;
      base += n;
    }
  }
  el("line", { class: "grid", x1: L, x2: W - 8, y1: H - B, y2: H - B }, svg);
  for (let i = 0; i <= 4; i++) {
    const v = maxLen * i / 4;
    el("text", { class: "axis", x: x(v), y: H - 8, "text-anchor": "middle" }, svg).textContent = Math.round(v);
  }
  el("text", { class: "axis", x: 4, y: T + 8 }, svg).textContent = top;
  el("text", { class: "axis", x: 4, y: H - B }, svg).textContent = "0";
  container.replaceChildren(svg);
}

function lineChart(container, series, opts = {}) {
  // series: [{values: [[t, v], ...]}], drawn over the last WINDOW_S seconds.
  const W = 420, H = 140, L = 38, B = 18, T = series.length > 1 ? 20 : 6;  // room for a legend row
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  const now = points.length ? points[points.length - 1].t : 0;
  const t0 = now - WINDOW_S;
  const all = series.flatMap(s => s.values.map(p => p[1])).filter(v => v !== null && v !== undefined);
  const top = opts.max ?? Math.max(1e-9, ...all) * 1.1;
  const x = t => L + (W - L - 4) * (t - t0) / WINDOW_S;
  const y = v => H - B - (H - B - T) * Math.min(v, top) / top;
  for (let i = 0; i <= 2; i++) {
    const v = top * i / 2;
    el("line", { class: "grid", x1: L, x2: W - 4, y1: y(v), y2: y(v) }, svg);
    el("text", { class: "axis", x: 2, y: y(v) + 3 }, svg).textContent = fmt(v * (opts.scale || 1), opts.digits ?? 1);
  }
  el("text", { class: "axis", x: L, y: H - 4 }, svg).textContent = `-${WINDOW_S / 60} min`;
  el("text", { class: "axis", x: W - 4, y: H - 4, "text-anchor": "end" }, svg).textContent = "now";
  series.forEach((s, i) => {
    let d = "";
    for (const [t, v] of s.values) {
      if (v === null || v === undefined || t < t0) { continue; }
      d += `${d ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
    }
    if (d) el("path", { class: `line s${i}`, d }, svg).appendChild(el("title")).textContent = s.name || "";
    if (series.length > 1) {  // a legend above the plot: each series' name in its line's colour
      el("text", { class: `axis key s${i}`, x: L + 90 * i, y: 11 }, svg).textContent = s.name;
    }
  });
  container.replaceChildren(svg);
}

function drawSeries() {
  const pick = f => points.map(p => [p.t, f(p)]);
  lineChart(document.getElementById("ts-throughput"), [{ name: "decode tok/s", values: pick(p => p.decode_tok_s) }], { digits: 0 });
  lineChart(document.getElementById("ts-tpot"), [
    { name: "TPOT p50", values: pick(p => p.tpot_p50_s) },
    { name: "TPOT p99", values: pick(p => p.tpot_p99_s) }], { scale: 1000, digits: 0 });
  lineChart(document.getElementById("ts-alignment"), [
    { name: "alignment", values: pick(p => p.alignment) },
    { name: "bubble share", values: pick(p => p.bubble_share) }], { max: 1, digits: 1 });
  lineChart(document.getElementById("ts-transfer"), [{ name: "KV MB/s", values: pick(p => p.transfer_bytes_s) }], { scale: 1e-6 });
  const tiers = [...new Set(points.flatMap(p => Object.keys(p.kv_usage || {})))];
  lineChart(document.getElementById("ts-kv"), tiers.map(tier => ({ name: tier, values: pick(p => (p.kv_usage || {})[tier]) })), { max: 1, digits: 1 });
}

// ---- panels ---------------------------------------------------------------------------------

function drawDecision(d) {
  // Why the policy planned its last iteration as it did (filled, grouped, switched, preempted,
  // waiting), and the decode step it predicted from the engine's step cost beside the measured one.
  const el = document.getElementById("decision");
  el.dataset.kind = d ? d.kind : "";
  if (!d) {
    el.className = "muted";
    el.textContent = "no decision yet (nothing decoded, or the policy explains none)";
    return;
  }
  const ms = x => (x === null || x === undefined) ? "-" : (1000 * x).toFixed(1);
  const ratio = d.predicted_over_measured === null ? "-" : d.predicted_over_measured.toFixed(2);
  el.className = "";
  const head = document.createElement("div");
  const kind = document.createElement("span");
  kind.className = "badge";
  kind.textContent = d.kind;
  const reason = document.createElement("span");
  reason.id = "decision-reason";
  reason.textContent = " " + d.reason;
  head.append(kind, reason);
  const step = document.createElement("div");
  step.id = "decision-step";
  step.dataset.predicted = d.predicted_s === null ? "" : d.predicted_s;
  step.dataset.measured = d.measured_s === null ? "" : d.measured_s;
  step.textContent = `decode step: predicted ${ms(d.predicted_s)} ms, measured ${ms(d.measured_s)} ms ` +
    `(recent predicted / measured, median: ${ratio})`;
  const kinds = document.createElement("div");
  kinds.className = "muted";
  kinds.textContent = Object.entries(d.kinds).map(([k, v]) => `${k} ${v}`).join(", ") + " in the last 256 decode iterations";
  el.replaceChildren(head, step, kinds);
}

function drawState(state) {
  lastState = state;
  document.getElementById("policy").textContent = state.policy;
  document.getElementById("draining").hidden = !state.draining;
  document.getElementById("clock").textContent = `updated ${new Date().toLocaleTimeString()}`;
  const counts = document.getElementById("counts");
  counts.replaceChildren(...Object.entries(state.counts).map(([k, v]) => {
    const div = document.createElement("div");
    div.className = "count";
    div.dataset.state = k;
    div.innerHTML = `<b>${v}</b><span>${k}</span>`;
    return div;
  }));
  // Requests refused before they were accepted (a full queue, draining, bad input), by reason.
  const refused = state.totals.refused || {};
  const total = Object.values(refused).reduce((a, b) => a + b, 0);
  const div = document.createElement("div");
  div.className = "count";
  div.dataset.state = "refused";
  div.title = Object.entries(refused).map(([k, v]) => `${k}: ${v}`).join(", ") || "none refused";
  div.innerHTML = `<b>${total}</b><span>refused</span>`;
  counts.append(div);
  drawDecision(state.totals.decision);
  histogram(document.getElementById("kv-histogram"), state.kv_histogram, state.running_span, state.staged_span);
  const tiers = document.getElementById("tiers");
  tiers.replaceChildren(...Object.entries(state.kv_blocks).map(([tier, b]) => {
    const div = document.createElement("div");
    div.className = "tier";
    const cap = Math.max(1, b.capacity);
    div.innerHTML = `<div>${tier}: ${b.used} used / ${b.reserved} reserved / ${b.capacity}</div>` +
      `<div class="tier-bar" data-tier="${tier}"><div class="reserved" style="width:${100 * b.reserved / cap}%"></div>` +
      `<div class="used" style="width:${100 * b.used / cap}%"></div></div>`;
    return div;
  }));
}

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

function drawRequests(requests) {
  const body = document.querySelector("#requests-table tbody");
  body.replaceChildren(...requests.map(r => {
    const tr = document.createElement("tr");
    tr.className = "clickable";
    tr.dataset.id = r.id;
    for (const v of [r.id, r.state, r.tier ?? "-", r.prompt_len, `${r.tokens}/${r.max_tokens}`, r.kv_len, fmt(r.age_s, 1), r.finish_reason ?? ""]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    const td = document.createElement("td");
    if (!r.finish_reason) {
      const b = document.createElement("button");
      b.textContent = "cancel";
      b.onclick = ev => { ev.stopPropagation(); act(`/api/requests/${encodeURIComponent(r.id)}/cancel`); };
      td.appendChild(b);
    }
    tr.appendChild(td);
    tr.onclick = () => showHistory(r.id);
    return tr;
  }));
}

async function showHistory(id) {
  const pre = document.getElementById("request-history");
  try {
    const r = await getJSON(`/api/requests/${encodeURIComponent(id)}`);
    pre.textContent = `${r.id} (${r.state})\n` + r.history.map(h => `${fmt(h.t, 3)}  ${h.event}  ${h.detail || ""}`).join("\n");
  } catch (e) { pre.textContent = String(e); }
}

async function refreshGpus() {
  const panel = document.getElementById("gpu-panel");
  try {
    const g = await getJSON("/api/gpus");
    if (!g.available) {
      panel.className = "muted";
      panel.dataset.available = "false";
      panel.textContent = g.reason || "no NVIDIA driver";
      return;
    }
    panel.className = "";
    panel.dataset.available = "true";
    const rows = g.gpus.map(d => `<tr><td>${d.index}</td><td>${d.name}</td><td>${fmt(d.utilization_pct, 0)}%</td>` +
      `<td>${fmt(d.memory_used_bytes / 2 ** 30, 1)} / ${fmt(d.memory_total_bytes / 2 ** 30, 0)} GiB</td>` +
      `<td>${fmt(d.pcie_rx_bytes_s / 1e9, 1)} / ${fmt(d.pcie_tx_bytes_s / 1e9, 1)}</td>` +
      `<td>${d.nvlink_tx_bytes_s === null ? "-" : fmt(d.nvlink_tx_bytes_s / 1e9, 1)}</td>` +
      `<td>${fmt(d.temperature_c, 0)} C</td><td>${fmt(d.power_w, 0)} W</td></tr>`).join("");
    panel.innerHTML = `<table><thead><tr><th>#</th><th>name</th><th>util</th><th>memory</th><th>PCIe rx/tx GB/s</th>` +
      `<th>NVLink tx GB/s</th><th>temp</th><th>power</th></tr></thead><tbody>${rows}</tbody></table>`;
  } catch (e) { panel.textContent = String(e); }
}

// ---- operator actions -----------------------------------------------------------------------

async function loadPolicies() {
  // Every registered policy; one this engine cannot run is listed but disabled, with the reason.
  const select = document.getElementById("policy-select");
  try {
    const p = await getJSON("/api/policies");
    select.replaceChildren(...p.policies.map(info => {
      const option = document.createElement("option");
      option.value = option.textContent = info.name;
      option.title = info.available ? info.summary : info.reason;
      option.disabled = !info.available;
      option.dataset.summary = info.available ? info.summary : `unavailable: ${info.reason}`;
      return option;
    }));
    select.value = p.current;
    showPolicySummary();
    select.dataset.loaded = "true";
  } catch (e) {
    setTimeout(loadPolicies, 2000);  // the server may be starting; try again
  }
}

function showPolicySummary() {
  const option = document.getElementById("policy-select").selectedOptions[0];
  document.getElementById("policy-summary").textContent = option ? option.dataset.summary : "";
}

async function act(path, body) {
  const out = document.getElementById("action-result");
  const token = document.getElementById("token").value.trim();
  try {
    const r = await fetch(path, {
      method: "POST",
      headers: Object.assign({ "Content-Type": "application/json" }, token ? { Authorization: `Bearer ${token}` } : {}),
      body: JSON.stringify(body || {}),
    });
    let text = await r.text();
    try { const j = JSON.parse(text); text = j.detail ?? JSON.stringify(j); } catch (e) { /* plain text */ }
    out.textContent = `${r.status}: ${typeof text === "string" ? text : JSON.stringify(text)}`;
    out.dataset.status = String(r.status);
  } catch (e) {
    out.textContent = String(e);
  }
}

document.getElementById("drain").onclick = () => act("/api/drain");
document.getElementById("resume").onclick = () => act("/api/resume");
document.getElementById("policy-select").onchange = showPolicySummary;
document.getElementById("switch-policy").onclick = () => act("/api/policy", { policy: document.getElementById("policy-select").value });
document.getElementById("cancel").onclick = () => {
  const id = document.getElementById("cancel-id").value.trim();
  if (id) act(`/api/requests/${encodeURIComponent(id)}/cancel`);
};

// ---- live updates ---------------------------------------------------------------------------

function setStatus(text, cls) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = `status ${cls}`;
}

function addPoint(p) {
  if (!p) return;
  if (points.length && points[points.length - 1].t >= p.t) {
    points[points.length - 1] = p;  // the same second, refreshed
  } else {
    points.push(p);
  }
  while (points.length && points[0].t < p.t - WINDOW_S) points.shift();
}

function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("update", ev => {
    const data = JSON.parse(ev.data);
    drawState(data.state);
    drawRequests(data.requests);  // the same snapshot as the counts
    addPoint(data.point);
    drawSeries();
    setStatus("live", "live");
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  });
  source.onerror = () => setStatus("reconnecting…", "down");  // EventSource retries on its own
}

async function start() {
  try {
    const ts = await getJSON(`/api/timeseries?minutes=${WINDOW_S / 60}`);
    ts.points.forEach(addPoint);
    drawSeries();
    drawState(await getJSON("/api/state"));
  } catch (e) { setStatus(String(e), "down"); }
  connect();
  loadPolicies();
  refreshGpus();
  setInterval(refreshGpus, 5000);
}

start();
