// msfusion dashboard: fetch the run's picture from the JSON API, re-render when the SSE stream says something happened.
"use strict";
window.msfusion = (function () {
  const params = new URLSearchParams(location.search);
  const $ = (id) => document.getElementById(id);
  const MB = (b) => (b == null ? "" : b < 2 ** 20 ? (b / 2 ** 20).toFixed(3) : (b / 2 ** 20).toFixed(b < 2 ** 24 ? 2 : 0));
  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const COLORS = { plan_s: "#8ab", export_s: "#c9a", slice_s: "#aa8", publish_s: "#9c9", collect_s: "#6a9", merge_s: "#e96", eval_s: "#78c", checkpoint_s: "#bbb" };
  const charts = {};

  async function json(url) {
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) throw new Error(url + ": " + response.status);
    return response.json();
  }

  async function runId() {
    if (params.get("run")) return params.get("run");
    const runs = await json("/api/runs");
    const nav = $("runs");
    if (nav) nav.innerHTML = runs.map((r) => `<a href="/?run=${encodeURIComponent(r.id)}">${esc(r.id)} (${esc(r.state)})</a>`).join("");
    if (!runs.length) throw new Error("no run yet");
    return runs[0].id;
  }

  function chart(id, title, series, data, height) {
    const el = $(id);
    const width = Math.max(300, el.clientWidth || 500);
    if (charts[id]) { charts[id].setData(data); return; }
    const opts = { width, height: height || 220, scales: { x: { time: false } }, axes: [{ label: "round" }, {}],
      series: [{ label: "round" }].concat(series) };
    charts[id] = new uPlot(opts, data, el);
  }

  // Re-render at most every 300 ms, whatever the stream delivers.
  function live(run, since, render) {
    let pending = false;
    const source = new EventSource(`/api/runs/${encodeURIComponent(run)}/events?since=${since}`);
    const kick = () => { if (!pending) { pending = true; setTimeout(() => { pending = false; render(); }, 300); } };
    for (const kind of ["run_started", "fleet", "round", "run_finished"]) source.addEventListener(kind, kick);
    source.onerror = () => { const el = $("live"); if (el) el.textContent = "stream reconnecting…"; };
    source.onopen = () => { const el = $("live"); if (el) el.textContent = "live"; };
    return source;
  }

  async function index() {
    const run = await runId();
    $("run-id").textContent = run;
    const render = async () => {
      const p = await json(`/api/runs/${encodeURIComponent(run)}`);
      const r = p.run;
      $("state").textContent = r.state; $("state").className = "badge " + r.state;
      $("round-counter").textContent = r.rounds_done; $("rounds-total").textContent = r.rounds ?? "?";
      $("strategy").textContent = r.strategy ?? ""; $("model").textContent = (r.model ?? "") + (r.params ? ` (${r.params.toLocaleString()} parameters)` : "");
      $("fleet").tBodies[0].innerHTML = Object.entries(p.devices).map(([d, x]) => {
        const share = x.budget_bytes && x.peak_rss_bytes ? Math.min(1, x.peak_rss_bytes / x.budget_bytes) : 0;
        const over = x.budget_bytes && x.peak_rss_bytes > x.budget_bytes ? " over" : "";
        return `<tr data-device="${esc(d)}"><td><a href="/devices/${encodeURIComponent(d)}?run=${encodeURIComponent(run)}">${esc(d)}</a></td>` +
          `<td>${esc(x.board || x.arch || "")}${x.cores ? ` · ${x.cores} cores` : ""} <span class="muted">(sized by ${esc(x.sized_by)})</span></td><td><span class="badge ${esc(x.state)}">${esc(x.state)}</span></td>` +
          `<td>${x.width_this_round != null ? x.width_this_round.toFixed(3) : (x.width != null ? x.width.toFixed(3) : "")}</td>` +
          `<td><span class="bar${over}"><i style="width:${(100 * share).toFixed(1)}%"></i></span> ${MB(x.peak_rss_bytes)} / ${MB(x.budget_bytes)} MB</td>` +
          `<td>${x.step_time_s != null ? (1000 * x.step_time_s).toFixed(1) + " ms" : ""}</td>` +
          `<td>${MB(x.bytes_down_total)} MB</td><td>${MB(x.bytes_up_total)} MB</td><td class="reason">${esc(x.last_failure)}</td></tr>`;
      }).join("");
      const excluded = Object.entries(p.excluded || {});
      $("excluded").textContent = excluded.length ? "left out for their data: " + excluded.map(([d, why]) => `${d} (${why})`).join("; ") : "";
      $("failures").tBodies[0].innerHTML = p.failures.slice(-50).reverse().map((f) =>
        `<tr><td>${esc(f.round + 1)}</td><td>${esc(f.device)}</td><td class="reason">${esc(f.reason)}</td></tr>`).join("");
      $("timeline").tBodies[0].innerHTML = p.rounds.slice().reverse().map((x) => {
        const t = x.timings_s || {}; const total = Object.values(t).reduce((a, b) => a + b, 0) || 1;
        const replies = Object.values(x.replies || {}); const merged = replies.filter((v) => v === "merged").length;
        const stack = Object.entries(t).map(([k, v]) => `<i title="${esc(k)} ${v.toFixed(2)} s" style="width:${(100 * v / total).toFixed(1)}%;background:${COLORS[k] || "#999"}"></i>`).join("");
        const parts = ["plan_s", "export_s", "publish_s", "collect_s", "merge_s", "eval_s"].map((k) => (t[k] ?? 0).toFixed(2)).join(" · ");
        const m = x.metrics || {}; const value = m[p.metric];
        return `<tr><td>${x.round_idx + 1}</td><td>${x.attempt + 1}</td><td>${x.merged ? "yes" : "no"}</td>` +
          `<td>${merged} merged, ${replies.length - merged} failed</td><td><span class="stack">${stack}</span> ${parts}</td>` +
          `<td>${(x.wall_s ?? 0).toFixed(1)} s</td><td>${value != null ? value.toFixed(4) : ""}</td></tr>`;
      }).join("");
      $("metric-title").textContent = p.metric === "perplexity" ? "Perplexity" : "Accuracy";
      chart("curve", p.metric, [{ label: p.metric, stroke: "#2a7", width: 2 }], [p.curve.map((c) => c[0]), p.curve.map((c) => c[1])]);
      return p;
    };
    const first = await render();
    live(run, first.events, render);
  }

  async function device() {
    const run = await runId();
    const name = decodeURIComponent(location.pathname.split("/").pop());
    $("device-id").textContent = name; $("back").href = "/?run=" + encodeURIComponent(run);
    const render = async () => {
      const all = await json(`/api/runs/${encodeURIComponent(run)}/devices`);
      const x = all[name] || { history: [] };
      $("state").textContent = x.state ?? "unknown"; $("state").className = "badge " + (x.state ?? "");
      $("width").textContent = x.width != null ? x.width.toFixed(3) : "?";
      $("budget").textContent = MB(x.budget_bytes) + " MB"; $("sized-by").textContent = x.sized_by ?? "";
      $("failures").textContent = x.failures ?? 0; $("last-failure").textContent = x.last_failure ? "last failure: " + x.last_failure : "";
      const h = x.history;
      $("history").tBodies[0].innerHTML = h.slice().reverse().map((e) =>
        `<tr><td>${e.round_idx + 1}</td><td>${e.attempt + 1}</td><td class="${e.reply === "merged" ? "" : "reason"}">${esc(e.reply)}</td>` +
        `<td>${e.width != null ? e.width.toFixed(3) : ""}</td><td>${MB(e.peak_rss_bytes)}</td>` +
        `<td>${e.step_time_s != null ? (1000 * e.step_time_s).toFixed(1) : ""}</td><td>${MB(e.bytes_down)}</td><td>${MB(e.bytes_up)}</td></tr>`).join("");
      const rounds = h.map((e) => e.round_idx + 1);
      chart("memory", "MB", [{ label: "peak MB", stroke: "#36c", width: 2 }, { label: "budget MB", stroke: "#c33", dash: [6, 4] }],
        [rounds, h.map((e) => (e.peak_rss_bytes ?? 0) / 2 ** 20), h.map(() => (x.budget_bytes ?? 0) / 2 ** 20)]);
      chart("steps", "ms", [{ label: "step ms", stroke: "#2a7", width: 2 }], [rounds, h.map((e) => 1000 * (e.step_time_s ?? 0))]);
      return all;
    };
    await render();
    const picture = await json(`/api/runs/${encodeURIComponent(run)}`);
    live(run, picture.events, render);
  }

  return { index, device };
})();
