// Shadow mode panel of the dashboard: renders /api/shadow every 10 s (textContent only).
(function () {
  "use strict";
  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }
  function fmt(v, digits) { return v === null || v === undefined ? "-" : Number(v).toFixed(digits); }
  function volumes(v) {
    const parts = [];
    for (const side of ["shadow", "live"]) {
      const entries = Object.entries(v[side] || {}).map(([k, ml]) => `${k} ${fmt(ml, 1)}`);
      if (entries.length) parts.push(`${side}: ${entries.join(", ")}`);
    }
    return parts.join(" · ");
  }
  function fill(id, rows) {
    const body = document.querySelector(`#${id} tbody`);
    body.replaceChildren(...rows);
  }
  async function refresh() {
    let report;
    try {
      const r = await fetch("/api/shadow?series_limit=20");
      if (!r.ok) return;
      report = await r.json();
    } catch (e) { return; }
    document.getElementById("shadow-empty").hidden = report.pairs.length > 0;
    fill("shadow-table", report.pairs.map(p => {
      const tr = document.createElement("tr");
      tr.append(cell(p.shadow_model), cell(p.live_model), cell(String(p.series), "num"),
        cell(fmt(p.mean_dice, 3), "num strong"),
        cell(`${p.shadow_findings} / ${p.live_findings} / ${p.matched_findings}`, "num"),
        cell(fmt(p.finding_agreement, 3), "num"), cell(volumes(p.mean_volumes_ml)));
      return tr;
    }));
    const series = [];
    for (const p of report.pairs) {
      for (const s of p.series_list) {
        const tr = document.createElement("tr");
        const labels = Object.entries(s.dice_per_label).map(([k, d]) => `${k} ${fmt(d, 3)}`).join(", ");
        tr.append(cell(`${p.shadow_model} vs ${p.live_model}`), cell(s.series_instance_uid, "uids"),
          cell(`${s.shadow_job_id} / ${s.live_job_id}`, "num"), cell(fmt(s.dice, 3), "num"), cell(s.basis),
          cell(labels), cell(`${s.shadow_findings} / ${s.live_findings} / ${s.matched_findings}`, "num"));
        series.push(tr);
      }
    }
    fill("shadow-series", series);
    const events = document.getElementById("shadow-events");
    events.replaceChildren(...report.events.slice(0, 5).map(e => {
      const p = document.createElement("p");
      p.className = "muted";
      p.textContent = `${new Date(e.at * 1000).toISOString().replace(".000", "")}: ${e.detail}`;
      return p;
    }));
  }
  refresh();
  setInterval(refresh, 10000);
})();
