// dicom-node dashboard: fetches /api every 2 s and renders with DOM calls (textContent only,
// never innerHTML with data, so an error text can never inject markup).
"use strict";

const DicomNode = (() => {
  const REFRESH_MS = 2000;
  const TOKEN_KEY = "dicomNodeApiToken";

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

  function fillBody(table, rows) {
    table.tBodies[0].replaceChildren(...rows);
  }

  function duration(s) {
    if (s === null || s === undefined) return "";
    if (s < 1) return `${(s * 1000).toFixed(0)} ms`;
    if (s < 60) return `${s.toFixed(1)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  }

  function clock(t) {
    if (!t) return "";
    const d = new Date(t * 1000);
    const today = new Date().toDateString() === d.toDateString();
    return today ? d.toLocaleTimeString() : d.toLocaleString();
  }

  function ago(t) {
    return t ? `${duration(Math.max(0, Date.now() / 1000 - t))} ago` : "";
  }

  function studyDate(da) {
    // StudyDate is a DA (YYYYMMDD): shown as 2026-12-06, never reformatted into a locale's order.
    return da && /^\d{8}$/.test(da) ? `${da.slice(0, 4)}-${da.slice(4, 6)}-${da.slice(6)}` : "";
  }

  function nextAttempt(t) {
    // "next attempt at 21:40:03 (in 12 s)" for a delivery waiting for its retry.
    if (!t) return "";
    const wait = t - Date.now() / 1000;
    return `next attempt at ${clock(t)}${wait > 0 ? ` (in ${duration(wait)})` : " (due)"}`;
  }

  function stateBadge(state, mode) {
    // A shadow job reads "done (shadow)": its results stay in the node, never delivered.
    const shadow = mode === "shadow";
    return el("span", {class: `state state-${state}${shadow ? " state-shadow" : ""}`,
                       text: shadow ? `${state} (shadow)` : state});
  }

  function uid(value) {
    // UIDs of one site share a long root: show the distinctive tail, the whole UID in the tooltip.
    const short = value.length > 30 ? `…${value.slice(-29)}` : value;
    return el("span", {class: "uid", title: value, text: short});
  }

  function status(text, isError) {
    const s = document.getElementById("refresh-status");
    if (s) { s.textContent = text; s.classList.toggle("error-text", !!isError); }
  }

  async function getJSON(url) {
    const r = await fetch(url, {headers: {Accept: "application/json"}});
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return r.json();
  }

  function every(fn) {
    const run = async () => {
      try { await fn(); status(`updated ${new Date().toLocaleTimeString()}`, false); }
      catch (e) { status(`refresh failed: ${e.message}`, true); }
    };
    run();
    return setInterval(run, REFRESH_MS);
  }

  // -- token handling: asked once, kept for the tab's lifetime only ---------------------------
  function getToken(ask) {
    let token = sessionStorage.getItem(TOKEN_KEY);
    if (!token && ask) {
      token = window.prompt("API token (web.api_token) for retry and cancel:");
      if (token) sessionStorage.setItem(TOKEN_KEY, token.trim());
    }
    return token ? token.trim() : null;
  }

  function initTokenButton() {
    const b = document.getElementById("token-button");
    if (!b) return;
    const label = () => { b.textContent = sessionStorage.getItem(TOKEN_KEY) ? "Forget API token" : "Set API token"; };
    label();
    b.addEventListener("click", () => {
      if (sessionStorage.getItem(TOKEN_KEY)) sessionStorage.removeItem(TOKEN_KEY);
      else getToken(true);
      label();
    });
  }

  async function mutate(url) {
    const token = getToken(true);
    if (!token) return {ok: false, message: "no API token given"};
    const r = await fetch(url, {method: "POST", headers: {Authorization: `Bearer ${token}`, Accept: "application/json"}});
    let body = {};
    try { body = await r.json(); } catch (e) { /* non-JSON error page */ }
    if (r.status === 401) sessionStorage.removeItem(TOKEN_KEY);  // ask again next time
    initTokenButton();
    const text = body.message || (body.messages && body.messages.join(" ")) || body.detail || `HTTP ${r.status}`;
    return {ok: r.ok, message: text, body};
  }

  // -- dashboard -------------------------------------------------------------------------------
  function dashboard(opts) {
    initTokenButton();
    const filter = document.getElementById("state-filter");
    filter.addEventListener("change", () => {
      const u = new URL(window.location.href);
      if (filter.value) u.searchParams.set("state", filter.value); else u.searchParams.delete("state");
      history.replaceState(null, "", u);
      refreshJobs();
    });

    async function refreshJobs() {
      const q = filter.value ? `?state=${encodeURIComponent(filter.value)}&limit=200` : "?limit=200";
      const jobs = await getJSON(`/api/jobs${q}`);
      fillBody(document.getElementById("jobs-table"), jobs.map(j => el("tr", {"data-job-id": j.id, "data-state": j.state},
        el("td", {}, el("a", {href: `/jobs/${j.id}`, text: `#${j.id}`})),
        el("td", {class: "uids"},
          el("div", {class: "study", text: j.series_description || "(no series description)"}),
          el("div", {class: "study-sub", text: [j.modality, j.body_part_examined, j.calling_ae_title && `from ${j.calling_ae_title}`, j.study_date && `study ${studyDate(j.study_date)}`, `gen ${j.generation}`].filter(Boolean).join(" · ")}),
          uid(j.study_instance_uid), el("br"), uid(j.series_instance_uid)),
        el("td", {text: j.modality || ""}),
        el("td", {text: j.rule}),
        el("td", {text: j.model}),
        el("td", {title: j.reason || ""}, stateBadge(j.state, j.mode),
          j.state === "failed" && j.reason ? el("div", {class: "reason error-text", text: j.reason}) : "",
          j.next_attempt_at ? el("div", {class: "next-attempt muted", text: nextAttempt(j.next_attempt_at)}) : ""),
        el("td", {class: "num", text: duration(j.age_s)}),
        ...opts.stages.map(s => el("td", {class: "num", text: duration(j.stages[s])})),
        el("td", {class: "num strong", text: duration(j.end_to_end_s)}),
      )));
      document.getElementById("jobs-empty").hidden = jobs.length > 0;
    }

    async function refreshQueue() {
      const q = await getJSON("/api/queue");
      fillBody(document.getElementById("queue-table"), q.queues.map(d => el("tr", {},
        el("td", {text: d.queue}), el("td", {text: d.priority}),
        el("td", {class: "num strong", text: String(d.depth)}), el("td", {class: "num", text: duration(d.oldest_age_s)}))));
      const counts = document.getElementById("state-counts");
      counts.replaceChildren(...Object.entries(q.jobs_by_state).map(([state, n]) => {
        const b = el("button", {type: "button", class: `count state-${state}`, title: `show ${state} jobs`},
          el("span", {class: "n", text: String(n)}), el("span", {text: state}));
        b.addEventListener("click", () => { filter.value = state; filter.dispatchEvent(new Event("change")); });
        return b;
      }));
      // One row per worker (Celery node name): its main process and pool children together.
      const byHost = new Map();
      for (const w of q.workers) {
        const g = byHost.get(w.hostname);
        if (!g) { byHost.set(w.hostname, {...w, pids: [w.pid], warm_models: [...(w.warm_models || [])]}); continue; }
        g.pids.push(w.pid);
        g.warm_models = [...new Set([...g.warm_models, ...(w.warm_models || [])])];
        g.alive = g.alive || w.alive;
        g.last_seen = Math.max(g.last_seen, w.last_seen);
        g.queues = [...new Set([...g.queues, ...w.queues])];
        g.device = (g.device && g.device !== "auto") ? g.device : w.device;
        if (!g.current_job_id && w.current_job_id) Object.assign(g, {current_job_id: w.current_job_id, current_model: w.current_model, current_since: w.current_since});
      }
      const rows = [...byHost.values()].map(w => el("tr", {class: w.alive ? "" : "stale", "data-hostname": w.hostname},
        el("td", {text: w.hostname}), el("td", {class: "num", text: w.pids.join(", ")}),
        el("td", {text: w.queues.join(", ")}), el("td", {text: w.device || ""}),
        el("td", {class: "warm-models", text: w.warm_models.length ? w.warm_models.join(", ") : "none"}),
        el("td", {text: w.alive ? ago(w.last_seen) : `gone (${ago(w.last_seen)})`}),
        el("td", {}, w.current_job_id
          ? el("a", {href: `/jobs/${w.current_job_id}`, text: `#${w.current_job_id} ${w.current_model || ""} (${ago(w.current_since)})`})
          : "idle")));
      if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: "7", class: "error-text",
        text: `no worker heartbeat in the last ${q.alive_within_s} s`})));
      fillBody(document.getElementById("workers-table"), rows);
    }

    async function refreshDestinations() {
      const ds = await getJSON("/api/destinations");
      const rows = ds.flatMap(d => [el("tr", {"data-destination": d.name},
        el("td", {text: d.name}),
        el("td", {text: d.configured ? `${d.ae_title}@${d.host}:${d.port}` : "(not configured)"}),
        el("td", {}, el("span", {class: `health health-${d.status}`, text: d.status})),
        el("td", {text: ago(d.last_success_at)}), el("td", {text: ago(d.last_failure_at)}),
        el("td", {class: "num", text: `${d.delivered} / ${d.failed} / ${d.pending}`}),
        el("td", {class: "error-text", text: d.last_error || ""})),
        // An archive that keeps the first object of a SOP Instance UID hides corrected re-runs.
        ...(d.keeps_first_instance ? [el("tr", {class: "warning-row", "data-keeps-first": d.name},
          el("td", {colspan: "7", class: "reason warning-text", text: `Warning: ${d.keeps_first_instance}`}))] : [])]);
      if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: "7", class: "muted", text: "no destinations configured"})));
      fillBody(document.getElementById("destinations-table"), rows);
    }

    async function refreshSenders() {
      const ss = await getJSON("/api/senders");
      const rows = ss.map(x => el("tr", {"data-sender": x.calling_ae_title, "data-mode": x.mode},
        el("td", {text: x.calling_ae_title}), el("td", {text: x.rule || "(no rule)"}),
        el("td", {text: x.mode === "association" ? "at release (learned)" : "idle timer"}),
        el("td", {class: "num", text: String(x.series)}),
        el("td", {class: "num", text: `${(100 * x.split_rate).toFixed(0)} %`}),
        el("td", {class: "num", text: String(x.premature)})));
      if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: "6", class: "muted", text: "no completed series yet"})));
      fillBody(document.getElementById("senders-table"), rows);
    }

    async function refreshThroughput() {
      const t = await getJSON("/api/throughput");
      const dl = document.getElementById("throughput");
      const fig = (k, v) => [el("dt", {text: k}), el("dd", {text: v})];
      dl.replaceChildren(...fig("instances / min", t.instances_per_minute.toFixed(1)),
        ...fig("studies / hour", t.studies_per_hour.toFixed(1)),
        ...fig("received", `${t.instances} instances, ${(t.bytes / 1048576).toFixed(1)} MiB`),
        ...fig("jobs done / failed", `${t.jobs_done} / ${t.jobs_failed}`));
      const max = Math.max(1, ...t.per_minute);
      document.getElementById("sparkline").replaceChildren(...t.per_minute.map(n =>
        el("span", {style: `height:${Math.round(100 * n / max)}%`, title: `${n} instances`})));
    }

    async function refreshUnmatched() {
      const u = await getJSON("/api/unmatched-series?limit=50");
      document.getElementById("unmatched-count").textContent = `(${u.total})`;
      const rows = u.series.map(r => el("tr", {"data-series-uid": r.series_instance_uid},
        el("td", {class: "uids"}, el("a", {href: `/series/${encodeURIComponent(r.series_instance_uid)}`}, uid(r.series_instance_uid))),
        el("td", {text: r.modality || ""}), el("td", {text: r.series_description || ""}),
        el("td", {text: r.calling_ae_title || ""}), el("td", {class: "num", text: String(r.instance_count)}),
        el("td", {text: ago(r.completed_at)}),
        el("td", {class: "reason"}, ...r.routing.flatMap((why, i) => i ? [el("br"), why] : [why]))));
      if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: "7", class: "muted", text: "none: every complete series matched a rule"})));
      fillBody(document.getElementById("unmatched-table"), rows);
    }

    every(() => Promise.all([refreshJobs(), refreshQueue(), refreshSenders(), refreshDestinations(), refreshThroughput(),
                             refreshUnmatched()]));
  }

  // -- one job ---------------------------------------------------------------------------------
  function jobPage(jobId, opts) {
    initTokenButton();
    const tokenConfigured = document.body.dataset.tokenConfigured === "yes";
    const retry = document.getElementById("retry-button");
    const cancel = document.getElementById("cancel-button");
    const message = document.getElementById("action-message");
    let refresh = async () => {};

    function say(text, ok) {
      message.hidden = false;
      message.textContent = text;
      message.className = ok ? "message ok" : "message error";
    }

    const resend = document.getElementById("resend-button");
    const rerun = document.getElementById("rerun-button");
    const seriesUid = document.getElementById("job").dataset.seriesUid;
    const model = document.getElementById("job").dataset.model;
    for (const [button, url] of [[retry, `/api/jobs/${jobId}/retry`], [cancel, `/api/jobs/${jobId}/cancel`],
                                 [resend, `/api/jobs/${jobId}/resend`],
                                 [rerun, `/api/series/${encodeURIComponent(seriesUid)}/rerun?model=${encodeURIComponent(model)}`]]) {
      button.addEventListener("click", async () => {
        button.disabled = true;
        const r = await mutate(url);
        say(r.message, r.ok);
        if (r.ok && button === rerun && r.body.job_ids && r.body.job_ids.length) {
          const id = r.body.job_ids[0];
          message.append(" ", el("a", {href: `/jobs/${id}`, id: "rerun-link", text: `Open job ${id}`}));
        }
        await refresh();
      });
    }

    refresh = async () => {
      const j = await getJSON(`/api/jobs/${jobId}`);
      const badge = document.getElementById("job-state");
      badge.textContent = j.mode === "shadow" ? `${j.state} (shadow)` : j.state;
      badge.className = `state state-${j.state}${j.mode === "shadow" ? " state-shadow" : ""}`;
      document.getElementById("job-attempts").textContent = String(j.attempts);
      retry.disabled = !tokenConfigured || !j.actions.includes("retry");
      cancel.disabled = !tokenConfigured || !j.actions.includes("cancel");
      const finished = ["done", "failed", "cancelled"].includes(j.state);
      resend.disabled = !tokenConfigured || !(["done", "failed"].includes(j.state) && j.results.file_count > 0 && j.encoded_at);
      rerun.disabled = !tokenConfigured || !finished;
      // A failed job shows its reason; after a retry the last failure stays visible, muted.
      const err = document.getElementById("job-error");
      const lastFailure = [...j.events].reverse().find(e => e.state === "failed");
      if (j.state === "failed" && j.reason) {
        err.hidden = false; err.className = "error"; err.textContent = `Error: ${j.reason}`;
      } else if (lastFailure && lastFailure.detail) {
        err.hidden = false; err.className = "error past";
        err.textContent = `Last error (${clock(lastFailure.at)}, before the job was ${j.state === "cancelled" ? "cancelled" : "retried"}): ${lastFailure.detail}`;
      } else {
        err.hidden = true; err.textContent = "";
      }

      fillBody(document.getElementById("stages-table"), [el("tr", {},
        ...opts.stages.map(s => el("td", {class: "num", text: duration(j.stages[s]) || "–"})),
        el("td", {class: "num strong", text: duration(j.end_to_end_s) || "–"}))]);

      let prev = null;
      fillBody(document.getElementById("timeline-table"), j.events.map((e, i) => {
        const row = el("tr", {"data-state": e.state},
          el("td", {class: "num", text: String(i + 1)}), el("td", {}, stateBadge(e.state)),
          el("td", {text: clock(e.at)}), el("td", {class: "num", text: prev === null ? "" : `+${duration(e.at - prev)}`}),
          el("td", {text: e.detail || ""}));
        prev = e.at;
        return row;
      }));

      const rows = j.deliveries.map(d => el("tr", {"data-destination": d.destination},
        el("td", {text: d.destination}), el("td", {}, stateBadge(d.state), d.confirmation ? el("span", {class: "muted", text: ` ${d.confirmation}`}) : ""),
        el("td", {class: "num", text: String(d.attempts)}), el("td", {text: clock(d.last_attempt_at)}),
        el("td", {text: clock(d.done_at)}), el("td", {text: (d.objects || []).map(o =>
          `${o.sop_class || o.sop_instance_uid}: ${o.outcome}${o.detail && o.outcome !== "sent" ? ` (${o.detail})` : ""}`).join("; ")}),
        el("td", {class: "next-attempt", text: d.next_attempt_at ? nextAttempt(d.next_attempt_at) : ""}),
        el("td", {class: "error-text reason", text: d.last_error || ""})));
      if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: "8", class: "muted", text: "no destinations"})));
      fillBody(document.getElementById("deliveries-table"), rows);

      const mem = j.peak_memory;
      document.getElementById("job-peak-memory").textContent = mem
        ? `${mem.peak_mib} MiB on ${mem.device} (${mem.kind === "cuda_allocated" ? "GPU, allocated by PyTorch" : "process resident memory, growth over the run"})`
        : "";
      document.getElementById("job-model-warm").textContent = j.model_warm === null || j.model_warm === undefined
        ? "" : (j.model_warm ? "warm (already loaded)" : "cold (loaded for this job)");
      const res = document.getElementById("results");
      const items = Object.entries(j.results).flatMap(([k, v]) =>
        [el("dt", {text: k}), el("dd", {class: k.endsWith("_uid") ? "uid" : "", text: typeof v === "object" ? JSON.stringify(v) : String(v)})]);
      res.replaceChildren(...(items.length ? items : [el("dd", {class: "muted", text: "no results yet"})]));
    };
    every(refresh);
  }

  // -- one series ------------------------------------------------------------------------------
  function seriesPage(seriesUid) {
    initTokenButton();
    const message = document.getElementById("action-message");
    for (const [id, action] of [["series-rerun-button", "rerun"], ["series-reprocess-button", "reprocess"]]) {
      const button = document.getElementById(id);
      button.addEventListener("click", async () => {
        button.disabled = true;
        const r = await mutate(`/api/series/${encodeURIComponent(seriesUid)}/${action}`);
        message.hidden = false;
        message.textContent = r.message;
        message.className = r.ok ? "message ok" : "message error";
        for (const jobId of (r.ok && r.body.job_ids) || []) {
          message.append(" ", el("a", {href: `/jobs/${jobId}`, class: "new-job", text: `job ${jobId}`}));
        }
        button.disabled = false;
      });
    }
  }

  return {dashboard, jobPage, seriesPage, duration, clock, ago, el, fillBody, getJSON, every};
})();
