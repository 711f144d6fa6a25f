// dicom-node dashboard, latency panel: /api/latency every 5 s (per model p50 / p95 end to end
// and per stage over the last hour).  Its own file so other panels do not edit the same lines;
// DOM calls and textContent only, as in app.js.
"use strict";

(() => {
  const REFRESH_MS = 5000;
  const script = document.getElementById("latency-script");
  const stages = (script && script.dataset.stages ? script.dataset.stages.split(",") : []);

  function cell(value, field) {
    const td = document.createElement("td");
    td.className = "num";
    if (field) td.dataset.field = field;
    if (typeof value === "number") {
      td.dataset.value = String(value);
      td.textContent = `${value.toFixed(2)} s`;
    } else {
      td.textContent = value;
    }
    return td;
  }

  function row(m) {
    const tr = document.createElement("tr");
    tr.dataset.model = m.model;
    const name = document.createElement("td");
    name.textContent = m.model;
    tr.append(name, cell(String(m.jobs), "jobs"), cell(m.end_to_end.p50_s, "e2e-p50"),
              cell(m.end_to_end.p95_s, "e2e-p95"));
    for (const st of stages) {
      const q = m.stages[st];
      tr.append(cell(q ? `${q.p50_s.toFixed(2)} / ${q.p95_s.toFixed(2)} s` : "", `stage-${st}`));
    }
    return tr;
  }

  async function refresh() {
    const table = document.getElementById("latency-table");
    if (!table) return;
    const r = await fetch("/api/latency", {headers: {Accept: "application/json"}});
    if (!r.ok) return;  // the other panels report refresh failures in the header
    const data = await r.json();
    const rows = data.models.map(row);
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = 4 + stages.length;
      td.className = "muted";
      td.textContent = "no results delivered in the last hour";
      tr.append(td);
      rows.push(tr);
    }
    table.tBodies[0].replaceChildren(...rows);
  }

  const run = () => refresh().catch(() => {});
  run();
  setInterval(run, REFRESH_MS);
})();
