// dicom-node dashboard, models panel: /api/models every 10 s (kind, version, weights digest,
// devices, warm or cold and on which worker processes, the rules that use each model).  Its own
// file so other panels do not edit the same lines; DOM calls and textContent only, as in app.js.
"use strict";

(() => {
  const REFRESH_MS = 10000;

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  function row(m) {
    const tr = document.createElement("tr");
    tr.dataset.model = m.name;
    tr.dataset.warm = m.warm ? "warm" : "cold";
    const where = m.warm_on.map((w) => `${w.hostname} pid ${w.pid}${w.device ? " (" + w.device + ")" : ""}`);
    const warm = cell(m.warm ? `warm on ${where.join(", ")}` : "cold", "warm-state");
    tr.append(
      cell(m.name),
      cell(m.kind),
      cell(m.version || ""),
      cell(m.digest ? m.digest.slice(0, 12) : "", "digest"),
      cell(m.devices.join(", ")),
      warm,
      cell(m.rules.length ? m.rules.join(", ") : "no rule", "rules"),
    );
    if (m.error) {
      tr.append(cell(m.error, "reason health-failing"));
    }
    return tr;
  }

  async function refresh() {
    const table = document.getElementById("models-table");
    if (!table) return;
    const r = await fetch("/api/models", {headers: {Accept: "application/json"}});
    if (!r.ok) return;  // the other panels report refresh failures in the header
    const models = await r.json();
    table.tBodies[0].replaceChildren(...models.map(row));
  }

  const run = () => refresh().catch(() => {});
  run();
  setInterval(run, REFRESH_MS);
})();
