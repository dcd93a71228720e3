"""GET /dashboard: one self-refreshing page, drawn in the browser from /api/status.

The page carries the status it was served with (so it shows numbers at once, also to a
crawler or a headless browser that dumps the DOM) and fetches /api/status every two seconds.
It shows the arms with their patches, percentages and digests; per arm the totals and, over
time, request rate, error rate, p50/p95 latency, tokens/s and shadow disagreement as line
plots; the latest audit entries; feedback per arm and the heal view (open reports by fact, heal's
patches, its refusals and rollout decisions). Every text from the registry (facts, reasons, actors) is
inserted as text, never as markup. No file outside this page is loaded.
"""

from __future__ import annotations

import json
from typing import Any

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rankone serve</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0} .num{text-align:right;font-variant-numeric:tabular-nums} .err{color:#b00020;font-weight:600}
.mono{font-family:ui-monospace,monospace;font-size:.92em} .plots{display:flex;flex-wrap:wrap;gap:1em}
.plot{background:#fff;border:1px solid #ddd;padding:.4em} .plot h3{font-size:.9em;margin:0 0 .2em}
.legend span{margin-right:1em} .muted{color:#777}
</style></head><body>
<h1>rankone serve: <span id="model"></span></h1>
<div id="summary" class="muted"></div><div id="regerror" class="err"></div>
<h2>Arms</h2><table id="arms"></table>
<h2>Per arm, since start</h2><table id="totals"></table>
<h2>Shadow comparisons</h2><table id="shadow"></table>
<h2>Over time</h2><div class="legend" id="legend"></div><div class="plots" id="plots"></div>
<h2>Latest audit entries</h2><table id="audit"></table>
<h2>Feedback per arm</h2><table id="feedback"></table>
<h2>Heal: open reports by fact</h2><table id="heal-open"></table>
<h2>Heal: patches</h2><table id="heal-patches"></table>
<h2>Heal: refusals and skips</h2><table id="heal-refusals"></table>
<h2>Heal: rollout decisions</h2><table id="heal-decisions"></table>
<script id="status" type="application/json">__STATUS__</script>
<script>
"use strict";
const COLORS = {stable: "#1f77b4", candidate: "#d62728", base: "#7f7f7f", pin: "#9467bd", none: "#bcbd22"};
function el(tag, text, cls, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}
function fmt(v, kind) {
  if (v === null || v === undefined) return "-";
  if (kind === "ms") return (v * 1000).toFixed(1) + " ms";
  if (kind === "pct") return (v * 100).toFixed(1) + " %";
  if (kind === "rate") return v.toFixed(2);
  return String(v);
}
function table(id, head, rows) {
  const t = document.getElementById(id);
  t.replaceChildren();
  const tr = el("tr"); head.forEach(h => tr.appendChild(el("th", h))); t.appendChild(tr);
  rows.forEach(r => { const row = el("tr"); r.forEach(c => row.appendChild(c)); t.appendChild(row); });
}
function num(value, kind, attrs) {
  return el("td", fmt(value, kind), "num", Object.assign({"data-value": JSON.stringify(value)}, attrs));
}
function render(s) {
  document.getElementById("model").textContent = s.model;
  const e = s.engine;
  document.getElementById("summary").textContent =
    `up ${Math.round(s.uptime_s)} s · ${e.running} running, ${e.waiting} waiting (batch ${e.max_batch}, queue ${e.max_waiting})` +
    (e.swap_pending ? " · stable swap pending" : "") + (s.registry ? ` · registry ${s.registry.path}` : " · no registry");
  document.getElementById("regerror").textContent = s.registry && s.registry.error ? "registry error: " + s.registry.error : "";
  table("arms", ["arm", "digest", "patches", "canary %", "shadow %"], s.arms.map(a => {
    const patches = el("td");
    a.patches.forEach(p => { const d = el("div", null, null, {"data-patch": p.id});
      d.appendChild(el("span", p.id, "mono")); d.appendChild(el("span", ` (${p.state}) ` + p.facts.join("; "))); patches.appendChild(d); });
    if (!a.patches.length) patches.textContent = a.arm === "base" ? "none (the base model)" : "none";
    const st = a.staged || [];
    return [el("td", a.arm, null, {"data-arm": a.arm}), el("td", a.digest, "mono", {"data-digest": a.arm}), patches,
            el("td", st.map(x => `${x.id.slice(0, 8)}: ${x.canary}`).join(", ") || "-", "num", {"data-canary": a.arm}),
            el("td", st.map(x => `${x.id.slice(0, 8)}: ${x.shadow}`).join(", ") || "-", "num", {"data-shadow": a.arm})];
  }));
  const keys = [["requests"], ["errors"], ["error_rate", "pct"], ["latency_p50_s", "ms"], ["latency_p95_s", "ms"],
                ["ttft_p50_s", "ms"], ["tokens"], ["tokens_per_s", "rate"], ["unkeyed"]];
  table("totals", ["arm"].concat(keys.map(k => k[0])), Object.entries(s.totals).map(([arm, t]) =>
    [el("td", arm, null, {"data-total-arm": arm})].concat(keys.map(([k, kind]) => num(t[k], kind, {"data-arm": arm, "data-key": k})))));
  table("shadow", ["scope", "comparisons", "disagreements", "rate"], Object.entries(s.shadow).filter(([k]) => k !== "dropped")
    .map(([scope, c]) => [el("td", scope), num(c.comparisons, null, {"data-scope": scope, "data-key": "comparisons"}),
      num(c.disagreements, null, {"data-scope": scope, "data-key": "disagreements"}),
      num(c.comparisons ? c.disagreements / c.comparisons : null, "pct")]));
  plots(s.series);
  table("audit", ["seq", "time (UTC)", "actor", "action", "patch", "state", "reason"], ((s.registry || {}).audit || [])
    .slice().reverse().map(a => [el("td", a.seq, "num"), el("td", a.at.slice(0, 19).replace("T", " ")), el("td", a.actor),
      el("td", a.action), el("td", a.patch_id || "-", "mono"), el("td", a.to_state ? `${a.from_state || "-"} -> ${a.to_state}` : ""),
      el("td", a.reason || "")]));
  heal(s);
}
function heal(s) {
  table("feedback", ["arm", "right", "wrong"], Object.entries(s.feedback || {}).map(([arm, c]) =>
    [el("td", arm, null, {"data-feedback-arm": arm}), num(c.right, null, {"data-arm": arm, "data-key": "right"}),
     num(c.wrong, null, {"data-arm": arm, "data-key": "wrong"})]));
  const h = s.heal || {};
  table("heal-open", ["prompt", "correction", "users", "reports", "trusted", "last report"], (h.open || []).map(o =>
    [el("td", o.prompt), el("td", o.correction), num(o.users, null, {"data-key": "users"}), num(o.reports),
     el("td", o.trusted ? "yes" : "no"), el("td", (o.last_at || "").slice(0, 19).replace("T", " "))]));
  table("heal-patches", ["patch", "state", "edits", "facts", "reason"], (h.patches || []).map(p =>
    [el("td", p.id, "mono", {"data-heal-patch": p.id}), el("td", p.state), num(p.n_edits), el("td", p.facts.join("; ")),
     el("td", p.reason || "")]));
  table("heal-refusals", ["seq", "time (UTC)", "action", "reason"], (h.refusals || []).map(r =>
    [el("td", r.seq, "num"), el("td", r.at.slice(0, 19).replace("T", " ")), el("td", r.action), el("td", r.reason || "")]));
  table("heal-decisions", ["seq", "time (UTC)", "patch", "decision", "reason"], (h.decisions || []).map(d =>
    [el("td", d.seq, "num"), el("td", d.at.slice(0, 19).replace("T", " ")), el("td", d.patch_id || "-", "mono"),
     el("td", d.decision || ""), el("td", d.reason || "")]));
}
function plots(series) {
  const box = document.getElementById("plots"); box.replaceChildren();
  const b = series.buckets, arms = [...new Set(b.flatMap(x => Object.keys(x.arms)))];
  const legend = document.getElementById("legend"); legend.replaceChildren();
  arms.forEach(a => { const s = el("span", "\\u2014 " + a); s.style.color = COLORS[a] || "#000"; legend.appendChild(s); });
  const charts = [["requests / s", "requests_per_s"], ["error rate", "error_rate"], ["p50 latency (s)", "latency_p50_s"],
                  ["p95 latency (s)", "latency_p95_s"], ["tokens / s", "tokens_per_s"]];
  charts.forEach(([title, key]) => box.appendChild(chart(title, b, arms.map(a => [a, b.map(x => (x.arms[a] || {})[key])]))));
  box.appendChild(chart("shadow disagreement", b, [["candidate", b.map(x => x.shadow_disagreement)]]));
}
function chart(title, buckets, lines) {
  const W = 300, H = 120, P = 4, NS = "http://www.w3.org/2000/svg";
  const div = el("div", null, "plot"); div.appendChild(el("h3", title));
  const svg = document.createElementNS(NS, "svg"); svg.setAttribute("width", W); svg.setAttribute("height", H);
  const ts = buckets.map(x => x.t), vals = lines.flatMap(([, ys]) => ys).filter(v => v !== null && v !== undefined);
  const t0 = Math.min(...ts), t1 = Math.max(...ts, t0 + 1), top = Math.max(...vals, 1e-9);
  lines.forEach(([arm, ys]) => {
    const pts = ys.map((y, i) => y === null || y === undefined ? null :
      `${P + (ts[i] - t0) / (t1 - t0) * (W - 2 * P)},${H - P - y / top * (H - 2 * P)}`).filter(Boolean);
    if (!pts.length) return;
    const pl = document.createElementNS(NS, "polyline");
    pl.setAttribute("points", pts.join(" ")); pl.setAttribute("fill", "none");
    pl.setAttribute("stroke", COLORS[arm] || "#000"); pl.setAttribute("stroke-width", "1.5"); pl.setAttribute("data-line", arm);
    svg.appendChild(pl);
  });
  div.appendChild(svg); div.appendChild(el("div", vals.length ? `max ${top.toPrecision(3)}` : "no data yet", "muted"));
  return div;
}
render(JSON.parse(document.getElementById("status").textContent));
setInterval(() => fetch("/api/status").then(r => r.json()).then(render).catch(() => {}), 2000);
</script></body></html>
"""


def dashboard_html(status: dict[str, Any]) -> str:
    """The page with `status` inside it; every `<` is escaped (a JSON escape), so no text from the
    registry can close the script element or open a comment."""
    data = json.dumps(status).replace("<", "\\u003c")
    return _PAGE.replace("__STATUS__", data)
