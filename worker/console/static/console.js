// The console's pages: each asks the JSON API (/api/v1/) and fills its tables from <template>
// rows, again every data-refresh-ms (short polling). Values go in with textContent only, never
// as HTML, so nothing read from Redis can become markup or script.
"use strict";

const API = "/api/v1";
const body = document.body;
const refreshMs = Number(body.dataset.refreshMs || 2000);
const csrf = document.querySelector('meta[name="csrf-token"]').content;

function $(selector, root = document) { return root.querySelector(selector); }

function setStatus(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function getJson(path) {
  const response = await fetch(API + path, { headers: { Accept: "application/json" }, credentials: "same-origin" });
  if (response.status === 401) { window.location = "/login?next=" + encodeURIComponent(location.pathname + location.search); }
  const answer = await response.json();
  if (!response.ok) { throw new Error(answer.detail || response.statusText); }
  return answer;
}

async function postJson(path, payload) {
  const response = await fetch(API + path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf, Accept: "application/json" },
    body: JSON.stringify(payload),
  });
  const answer = await response.json();
  if (!response.ok) { throw new Error(answer.detail || response.statusText); }
  return answer;
}

// A row from a <template>: every [data-field] gets the value of that field.
function row(templateId, values) {
  const fragment = $("#" + templateId).content.cloneNode(true);
  for (const cell of fragment.querySelectorAll("[data-field]")) {
    const value = values[cell.dataset.field];
    cell.textContent = value === null || value === undefined || value === "" ? "-" : String(value);
  }
  return fragment;
}

function fill(tableId, templateId, items, decorate) {
  const tbody = $("#" + tableId + " tbody");
  const rows = document.createDocumentFragment();
  for (const item of items) {
    const fragment = row(templateId, item);
    if (decorate) { decorate(fragment.firstElementChild, item); }
    rows.appendChild(fragment);
  }
  tbody.replaceChildren(rows);
}

// Poll: run once now, then again refreshMs after each run ends. Returns {now, stop}: now() runs it
// at once (after a filter changes), stop() ends it (a new search replaces the old one).
function poll(run) {
  let timer = null;
  let stopped = false;
  let latest = 0;
  const tick = async () => {
    const mine = ++latest;
    clearTimeout(timer);
    try {
      await run();
      setStatus("Updated " + new Date().toLocaleTimeString());
    } catch (error) {
      setStatus("Could not update: " + error.message, true);
    }
    // Only the newest run schedules the next: a run started by now() must not start a second chain.
    if (!stopped && mine === latest) { timer = setTimeout(tick, refreshMs); }
  };
  tick();
  return { now: tick, stop: () => { stopped = true; clearTimeout(timer); } };
}

function changeLink(account, key) {
  return "/changes?" + new URLSearchParams({ key, account });
}

// -- Overview ------------------------------------------------------------------------------------

function drawRates(rates) {
  const svg = $("#rates");
  const ns = "http://www.w3.org/2000/svg";
  const series = ["succeeded", "failed", "retrying"];
  const peak = Math.max(0.1, ...series.flatMap((name) => rates[name]));
  const width = 720, height = 120;
  const paths = series.map((name) => {
    const values = rates[name];
    const step = width / Math.max(values.length - 1, 1);
    const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - (v / peak) * (height - 4)).toFixed(1)}`);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("class", "line " + name);
    return line;
  });
  svg.replaceChildren(...paths);
  for (const name of series) { $("#" + name + "-hour").textContent = rates[name + "_last_hour"]; }
  $("#rate-peak").textContent = peak.toFixed(1);
}

function overviewPage() {
  poll(async () => {
    const data = await getJson("/overview");
    $("#now").textContent = data.now;
    fill("accounts", "account-row", data.accounts.map((a) => ({
      ...a, rate: `${a.rate_limit.used_per_s} / ${a.rate_limit.per_s}`,
    })), (tr, a) => {
      tr.dataset.account = a.account;
      const link = tr.querySelector("a[data-field=dead_letters]");
      link.href = "/failures?" + new URLSearchParams({ account: a.account });
      if (a.paused_until) { tr.classList.add("paused"); }
    });
    fill("workers", "worker-row", data.workers.map((w) => ({ ...w, alive: w.alive ? "yes" : "no (silent)" })),
      (tr, w) => tr.classList.toggle("dead", !w.alive));
    $("#no-workers").hidden = data.workers.length > 0;
    drawRates(data.rates);
  });
}

// -- Failures ------------------------------------------------------------------------------------

function failuresPage() {
  const form = $("#filter");
  const selected = new Map(); // "account\u0000key" -> {account, key}
  let before = null;
  let shown = [];
  const isAdmin = body.dataset.role === "admin";

  const filter = () => {
    const values = {};
    for (const name of ["account", "error_code", "since"]) {
      const value = form.elements[name].value.trim();
      if (value) { values[name] = value; }
    }
    return values;
  };
  const describe = (f) => Object.entries(f).map(([k, v]) => `${k} ${v}`).join(", ") || "no filter: every dead letter";

  const updateButtons = () => {
    if (!isAdmin) { return; }
    $("#replay-selected").disabled = selected.size === 0;
    $("#discard-selected").disabled = selected.size === 0;
    $("#replay-selected").textContent = `Replay selected (${selected.size})`;
    $("#discard-selected").textContent = `Discard selected (${selected.size})`;
  };

  const refresh = poll(async () => {
    const params = new URLSearchParams({ ...filter(), limit: "50" });
    if (before) { params.set("before", before); }
    const data = await getJson("/failures?" + params);
    $("#recent-since").textContent = data.recent_since;
    $("#matching").textContent = `(${data.dead_letters_matching} matching)`;
    fill("groups", "group-row", data.groups, (tr, g) => {
      for (const link of tr.querySelectorAll("a[data-filter]")) {
        link.addEventListener("click", (event) => {
          event.preventDefault();
          form.elements.account.value = g.account;
          if (link.dataset.filter === "error_code") { form.elements.error_code.value = g.error_code; }
          applyFilter();
        });
      }
    });
    shown = data.dead_letters;
    fill("dead-letters", "dead-letter-row", shown, (tr, d) => {
      const id = d.account + "\u0000" + d.idempotency_key;
      tr.dataset.key = d.idempotency_key;
      tr.dataset.account = d.account;
      tr.querySelector("a[data-field=idempotency_key]").href = changeLink(d.account, d.idempotency_key);
      const pick = tr.querySelector("input.pick");
      if (pick) {
        pick.checked = selected.has(id);
        pick.addEventListener("change", () => {
          if (pick.checked) { selected.set(id, { account: d.account, key: d.idempotency_key }); } else { selected.delete(id); }
          updateButtons();
        });
      }
      for (const button of tr.querySelectorAll("button[data-scope=row]")) {
        button.addEventListener("click", () => ask(button.dataset.action, [{ account: d.account, key: d.idempotency_key }]));
      }
    });
    $("#no-dead-letters").hidden = shown.length > 0;
    $("#more").hidden = !data.next;
    $("#more").dataset.next = data.next || "";
    updateButtons();
  });

  const applyFilter = () => {
    before = null;
    selected.clear();
    const params = new URLSearchParams(filter());
    history.replaceState(null, "", "/failures" + (params.size ? "?" + params : ""));
    refresh.now();
  };
  form.addEventListener("submit", (event) => { event.preventDefault(); applyFilter(); });
  $("#clear-filter").addEventListener("click", () => { form.reset(); for (const i of form.elements) { if (i.name) { i.value = ""; } } applyFilter(); });
  $("#more").addEventListener("click", () => { before = $("#more").dataset.next; refresh.now(); });

  const selectAll = $("#select-all");
  if (selectAll) {
    selectAll.addEventListener("change", () => {
      for (const d of shown) {
        const id = d.account + "\u0000" + d.idempotency_key;
        if (selectAll.checked) { selected.set(id, { account: d.account, key: d.idempotency_key }); } else { selected.delete(id); }
      }
      refresh.now();
    });
  }

  // Replay or discard after a confirmation; the API answers key by key, and so does the page.
  const dialog = $("#confirm");
  let pending = null;
  function ask(action, picks) {
    const f = filter();
    pending = { action, picks, filter: f };
    $("#confirm-text").textContent = picks
      ? `${action === "replay" ? "Replay" : "Discard"} ${picks.length} dead letter(s): ${picks.map((p) => p.key).join(", ")}?`
      : `${action === "replay" ? "Replay" : "Discard"} every dead letter matching ${describe(f)}?`;
    dialog.showModal();
  }
  dialog.addEventListener("close", async () => {
    if (dialog.returnValue !== "ok" || !pending) { pending = null; return; }
    const { action, picks, filter: f } = pending;
    pending = null;
    const requests = [];
    if (picks) {
      const byAccount = new Map();
      for (const p of picks) { byAccount.set(p.account, [...(byAccount.get(p.account) || []), p.key]); }
      for (const [account, keys] of byAccount) { requests.push({ keys, account }); }
    } else {
      requests.push({ filter: f });
    }
    try {
      const results = [];
      for (const payload of requests) { results.push(...(await postJson("/dead-letters/" + action, payload)).results); }
      showOutcome(action, results);
      selected.clear();
    } catch (error) {
      setStatus(`Could not ${action}: ${error.message}`, true);
    }
    refresh.now();
  });
  for (const button of document.querySelectorAll(".actions button")) {
    button.addEventListener("click", () => ask(button.dataset.action,
      button.dataset.scope === "selected" ? [...selected.values()] : null));
  }
}

function showOutcome(action, results) {
  const counts = {};
  for (const r of results) { counts[r.status] = (counts[r.status] || 0) + 1; }
  $("#outcome").hidden = false;
  $("#outcome-summary").textContent = `${action}: ` +
    (Object.entries(counts).map(([status, n]) => `${n} ${status}`).join(", ") || "nothing matched");
  const list = $("#outcome-list");
  list.replaceChildren(...results.map((r) => {
    const item = document.createElement("li");
    item.textContent = `${r.account} / ${r.idempotency_key}: ${r.status}` + (r.message ? ` (${r.message})` : "");
    item.dataset.status = r.status;
    return item;
  }));
}

// -- A change ------------------------------------------------------------------------------------

function changePage() {
  const form = $("#search");
  let current = null;
  const show = () => {
    const key = form.elements.key.value.trim();
    const account = form.elements.account.value.trim() || "default";
    if (!key) { return; }
    history.replaceState(null, "", changeLink(account, key));
    if (current) { current.stop(); }
    current = poll(async () => {
      const data = await getJson("/changes/" + encodeURIComponent(key) + "?" + new URLSearchParams({ account }));
      const change = data.change;
      $("#change").hidden = false;
      $("#change-key").textContent = change.idempotency_key;
      $("#change-state").textContent = change.state;
      $("#change-state").dataset.state = change.state;
      for (const dd of document.querySelectorAll("[data-fact]")) {
        const value = change[dd.dataset.fact];
        dd.textContent = value === null || value === "" ? "-" : String(value);
      }
      // Refreshing rebuilds the rows: the events a person opened stay open.
      const open = new Set([...document.querySelectorAll("#timeline tbody tr")]
        .filter((tr) => tr.querySelector("details[open]")).map((tr) => tr.dataset.at));
      fill("timeline", "timeline-row", data.timeline.map((item) => ({
        ...item,
        what: item.kind === "enqueued"
          ? (item.generation > 0 ? `enqueued again (replay, generation ${item.generation})` : "enqueued")
          : `attempt ${item.attempt}: ${item.event}`,
      })), (tr, item) => {
        tr.dataset.kind = item.kind;
        tr.dataset.at = item.at;
        if (item.event) { tr.dataset.event = item.event; }
        const details = tr.querySelector("details.result");
        // The results stream's whole event, while the stream still holds it (enqueued rows have none).
        if (item.result) {
          details.querySelector("pre").textContent = JSON.stringify(item.result, null, 2);
          details.open = open.has(item.at);
        } else {
          details.remove();
        }
      });
      $("#change-json").textContent = JSON.stringify(change.change, null, 2);
    });
  };
  form.addEventListener("submit", (event) => { event.preventDefault(); show(); });
  show();
}

const pages = { overview: overviewPage, failures: failuresPage, change: changePage };
if (pages[body.dataset.page]) { pages[body.dataset.page](); }
