// The dashboard's "Rejected associations" panel (templates/partials/rejected_associations.html):
// the listener's newest rejections from /api/rejected-associations, refreshed with the rest.
"use strict";

(() => {
  const {el, fillBody, getJSON, every, clock, ago} = DicomNode;

  async function refresh() {
    const r = await getJSON("/api/rejected-associations");
    document.getElementById("rejected-count").textContent =
      r.total > r.rejections.length ? `(${r.total} since start, newest ${r.rejections.length})` : `(${r.total} since start)`;
    const rows = r.rejections.map(x => el("tr", {"data-calling-ae": x.calling_ae_title},
      el("td", {title: clock(x.at), text: ago(x.at)}), el("td", {text: x.calling_ae_title}),
      el("td", {text: x.called_ae_title}), el("td", {text: x.peer}),
      el("td", {class: "reason error-text", text: x.reason})));
    if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: "5", class: "muted", text: "none since the node started"})));
    fillBody(document.getElementById("rejected-table"), rows);
  }

  if (document.getElementById("rejected-table")) every(refresh);
})();
