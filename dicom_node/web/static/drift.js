// dicom-node drift panel: /api/drift every 15 s, histograms as inline SVG built with DOM calls
// (textContent only, never innerHTML with data).  Its own file so the dashboard's app.js stays as it is.
"use strict";

(() => {
  const REFRESH_MS = 15000;
  const SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Baseline (grey) and recent (blue, red when drifting) shares per bin, side by side.
  function histogram(feature) {
    const w = 260, h = 70, pad = 2, n = feature.bins.length;
    const top = Math.max(...feature.baseline, ...feature.recent, 0.01);
    const slot = (w - 2 * pad) / n, bar = Math.max(1, slot / 2 - 1);
    const root = svg("svg", {width: w, height: h + 14, viewBox: `0 0 ${w} ${h + 14}`, class: "drift-hist",
                             role: "img", "aria-label": `${feature.feature}: baseline against recent`});
    feature.bins.forEach((label, i) => {
      const x = pad + i * slot;
      for (const [which, shares, dx] of [["baseline", feature.baseline, 0], ["recent", feature.recent, bar + 1]]) {
        const bh = Math.max(0, (shares[i] / top) * (h - 4));
        const rect = svg("rect", {x: x + dx, y: h - bh, width: bar, height: bh,
                                  class: `drift-bar-${which}${feature.alert && which === "recent" ? " alert" : ""}`});
        rect.append(svg("title", {}, `${label}: ${which} ${(shares[i] * 100).toFixed(1)} %`));
        root.append(rect);
      }
    });
    root.append(svg("line", {x1: 0, x2: w, y1: h, y2: h, class: "drift-axis"}));
    root.append(svg("text", {x: 0, y: h + 12, class: "drift-tick"}, feature.bins[0]));
    if (n > 1) root.append(svg("text", {x: w, y: h + 12, class: "drift-tick", "text-anchor": "end"}, feature.bins[n - 1]));
    return root;
  }

  function ago(t) {
    const s = Math.max(0, Date.now() / 1000 - t);
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} days ago`;
  }

  function pairRow(p) {
    const worst = p.features[0];
    const every = el("details", {open: p.alert ? "" : null}, el("summary", {text: `${p.features.length} features`}),
      el("ul", {class: "drift-features"}, ...p.features.map(f =>
        el("li", {class: f.alert ? "alert" : null, text: `${f.feature}: ${f.psi.toFixed(3)}`}))));
    return el("tr", {class: p.alert ? "drift-alert" : null, "data-model": p.model, "data-scanner": p.scanner},
      el("td", {text: p.model}),
      el("td", {class: "uid", text: p.scanner}),
      el("td", {}, el("span", {class: `state drift-${p.status}`, text: p.status})),
      el("td", {class: "num", text: `${p.baseline_jobs} / ${p.recent_jobs}`}),
      el("td", {class: "num strong", text: p.max_psi === null ? "" : p.max_psi.toFixed(3)}),
      el("td", {text: worst ? worst.feature : ""}),
      el("td", {}, worst ? el("figure", {class: "drift-figure"}, histogram(worst),
        el("figcaption", {text: `${worst.feature}: PSI ${worst.psi.toFixed(3)}`}))
        : el("span", {class: "muted", text: "collecting"})),
      el("td", {}, p.features.length ? every : ""));
  }

  function scannerRow(s) {
    return el("tr", {class: s.silent ? "drift-alert" : null},
      el("td", {class: "uid", text: s.label}), el("td", {text: s.manufacturer}), el("td", {text: s.model_name}),
      el("td", {text: s.station}), el("td", {text: s.protocol}), el("td", {text: ago(s.last_seen)}),
      el("td", {}, el("span", {class: `state ${s.silent ? "drift-drift" : "drift-stable"}`,
                               text: s.silent ? "silent" : "yes"})));
  }

  async function refresh() {
    const r = await fetch("/api/drift", {headers: {Accept: "application/json"}});
    if (!r.ok) return;
    const d = await r.json();
    document.getElementById("drift-summary").textContent =
      `baseline: ${d.baseline}; recent: ${d.window}; alert above PSI ${d.psi_alert}; ` +
      `${d.alerts} drifting, ${d.silent} silent scanner(s) (none for ${d.silent_scanner_days} days)` +
      (d.enabled ? "" : " — monitoring is off ([drift] enabled = false)");
    document.querySelector("#drift-table tbody").replaceChildren(...d.pairs.map(pairRow));
    document.querySelector("#drift-scanners tbody").replaceChildren(...d.scanners.map(scannerRow));
    document.getElementById("drift-empty").hidden = d.pairs.length > 0;
    document.getElementById("drift").dataset.loaded = "yes";
  }

  const run = () => refresh().catch(() => {});
  run();
  setInterval(run, REFRESH_MS);
})();
