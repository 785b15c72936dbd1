// The ops console: plain JS, no build step. Reads the registry's /v1/capacity, the
// meter's /v1/usage (CORS) and follows /v1/events (EventSource); see docs/console.md.
"use strict";

const KEY_SLOT = "cb.key";
const MAX_EVENTS = 100;
const MAX_SAMPLES = 360;
const BAD = ["offline", "removed", "lost", "revoked", "preempted", "rejected", "exhausted", "expired"];

const $ = (id) => document.getElementById(id);
const state = { key: null, config: null, source: null, lastId: null, samples: [], events: 0, timers: {} };

function takeKeyFromUrl() {
  const url = new URL(location.href);
  const key = url.searchParams.get("key");
  if (key) {
    sessionStorage.setItem(KEY_SLOT, key);
    url.searchParams.delete("key");
    history.replaceState(null, "", url.pathname + (url.search ? url.search : "") + url.hash);
  }
  return sessionStorage.getItem(KEY_SLOT);
}

async function api(base, path) {
  const r = await fetch(base + path, { headers: { Authorization: "Bearer " + state.key } });
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
    const err = new Error(r.status + ": " + detail);
    err.status = r.status;
    throw err;
  }
  return r.json();
}

function setStatus(live, text) {
  const s = $("status");
  s.className = "status " + (live ? "live" : "off");
  s.dataset.state = live ? "live" : "off";
  s.textContent = text;
}

// --- capacity: totals, heatmap, time series ---------------------------------------------------
function colour(u) {
  const hue = 140 - 130 * Math.min(1, Math.max(0, u));
  return `hsl(${hue}, 55%, ${42 + 14 * u}%)`;
}

// milli-devices as devices: 1250 -> "1.25"
function devices(milli) { return (Number(milli || 0) / 1000).toFixed(2).replace(/\.?0+$/, "") || "0"; }

function renderShared(pools, total) {
  const body = $("shared").tBodies[0];
  body.replaceChildren(...pools.map((p) => {
    const tr = document.createElement("tr");
    tr.dataset.pool = p.pool_id;
    if (p.status !== "online") tr.className = "bad";
    const frag = p.fragmented_devices ? `${devices(p.fragmented_milli)} on ${p.fragmented_devices}` : "0";
    for (const v of [p.pool_id, p.region, p.model, p.devices, p.whole_free, frag,
                     p.largest_slice ? p.largest_slice + " milli" : "–"]) {
      const td = tr.insertCell(); td.textContent = v;
    }
    return tr;
  }));
  $("shared-note").textContent = !total ? "no pool shares its devices" :
    pools.length < total ? `the ${pools.length} most fragmented of ${total}` : `${total} pool${total === 1 ? "" : "s"}; fragmented: usable by shares only`;
}

function renderHeatmap(cells) {
  const box = $("heatmap");
  if (!cells.length) { box.innerHTML = '<p class="empty">no pools registered yet</p>'; return; }
  const regions = [...new Set(cells.map((c) => c.region))].sort();
  const models = [...new Set(cells.map((c) => c.model))].sort();
  const at = new Map(cells.map((c) => [c.region + "|" + c.model, c]));
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  head.appendChild(document.createElement("th"));
  for (const m of models) { const th = document.createElement("th"); th.textContent = m; head.appendChild(th); }
  const body = table.createTBody();
  for (const r of regions) {
    const row = body.insertRow();
    const th = document.createElement("th"); th.textContent = r; row.appendChild(th);
    for (const m of models) {
      const td = row.insertCell();
      const c = at.get(r + "|" + m);
      if (!c) { td.className = "none"; continue; }
      const u = c.capacity ? c.leased / c.capacity : 0;
      td.dataset.cell = r + "|" + m;
      td.dataset.free = c.free; td.dataset.leased = c.leased; td.dataset.capacity = c.capacity;
      td.style.background = c.online ? colour(u) : "#3a3f47";
      td.dataset.fragmented = c.fragmented_milli || 0;
      td.title = `${r} · ${m}\n${c.pools} pools (${c.online} online)\ncapacity ${c.capacity}, leased ${c.leased}, free ${c.free}` +
        (c.shared_pools ? `\n${c.shared_pools} sharing: whole free ${c.free}, fragmented ${devices(c.fragmented_milli)} ` +
          `on ${c.fragmented_devices} devices (largest slice ${c.largest_slice} milli)` : "");
      td.innerHTML = `<span class="n">${c.leased}/${c.capacity}</span>` +
        (c.fragmented_milli ? `<span class="f">+${devices(c.fragmented_milli)} frag</span>` : "") +
        `<span class="bar"><i style="width:${(100 * u).toFixed(1)}%"></i></span>`;
    }
  }
  box.replaceChildren(table);
}

function chart(svg, values, max, cls) {
  const w = 600, h = 160, n = values.length;
  let out = "";
  for (const f of [0.25, 0.5, 0.75]) out += `<line class="grid" x1="0" x2="${w}" y1="${h * f}" y2="${h * f}"/>`;
  if (n > 0) {
    const xs = (i) => (n === 1 ? w : (i / (n - 1)) * w);
    const ys = (v) => h - (max > 0 ? (v / max) * (h - 8) : 0) - 2;
    const pts = values.map((v, i) => `${xs(i).toFixed(1)},${ys(v).toFixed(1)}`).join(" ");
    if (cls === "line") out += `<polygon class="area" points="0,${h} ${pts} ${w},${h}"/>`;
    out += `<polyline class="${cls}" points="${pts}"/>`;
  }
  svg.innerHTML = out;
  svg.dataset.points = String(n);
}

function renderSeries() {
  const s = state.samples;
  // autoscale (to the next 10%) so a lightly used network is not a flat line at the bottom
  const umax = Math.min(1, Math.max(0.1, Math.ceil(10 * Math.max(0, ...s.map((x) => x.util)) * 1.1) / 10));
  chart($("util-chart"), s.map((x) => x.util), umax, "line");
  $("util-max").textContent = Math.round(100 * umax) + "%";
  const qmax = Math.max(1, ...s.map((x) => x.queue));
  chart($("queue-chart"), s.map((x) => x.queue), qmax, "qline");
  $("queue-max").textContent = String(Math.max(0, ...s.map((x) => x.queue)));
  if (s.length) {
    $("util-from").textContent = s[0].t.toLocaleTimeString();
    $("util-to").textContent = s[s.length - 1].t.toLocaleTimeString() + " · " + (100 * s[s.length - 1].util).toFixed(1) + "%";
    $("queue-to").textContent = s[s.length - 1].t.toLocaleTimeString();
  }
}

async function refreshCapacity() {
  const data = await api("", "/v1/capacity");
  const t = data.totals;
  $("total-capacity").textContent = t.capacity;
  $("total-leased").textContent = t.leased;
  $("total-free").textContent = t.free;
  $("total-util").textContent = (100 * t.utilisation).toFixed(1) + "%";
  $("queue-depth").textContent = data.queue_depth;
  $("total-pools").textContent = `${t.online}/${t.pools}`;
  $("total-fragmented").textContent = devices(t.fragmented_milli);
  renderHeatmap(data.cells);
  renderShared(data.shared || [], t.shared_pools || 0);
  state.samples.push({ t: new Date(), util: t.utilisation, queue: data.queue_depth });
  if (state.samples.length > MAX_SAMPLES) state.samples.shift();
  renderSeries();
}

// --- spend (the meter) ---------------------------------------------------------------------------
async function refreshSpend() {
  if (!state.config) return;
  try {
    const data = await api(state.config.meter_url, "/v1/usage?group_by=tenant");
    const rows = (data.rows || []).slice().sort((a, b) => Number(b.amount) - Number(a.amount)).slice(0, 10);
    const body = $("spend").tBodies[0];
    body.replaceChildren(...rows.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.tenant = r.tenant;
      for (const v of [r.tenant, `${r.amount} ${r.currency}`, Number(r.unit_hours || 0).toFixed(2)]) {
        const td = tr.insertCell(); td.textContent = v;
      }
      return tr;
    }));
    $("spend-note").textContent = rows.length ? "all periods" : "nothing billed yet";
  } catch (e) {
    $("spend-note").textContent = "meter: " + e.message;
  }
}

// --- reliability (docs/reliability.md) -----------------------------------------------------------
function secs(x) { return x === null || x === undefined ? "–" : Number(x).toFixed(1) + " s"; }

async function refreshReliability() {
  try {
    const rows = await api("", "/v1/reliability?limit=12");
    const body = $("reliability").tBodies[0];
    body.replaceChildren(...rows.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.pool = r.subject;
      tr.dataset.score = r.score;
      const lost = r.losses_per_1000h === null ? "–" : Number(r.losses_per_1000h).toFixed(1);
      for (const v of [r.subject, Number(r.score).toFixed(3), r.deliveries, r.failures, r.losses,
                       `${secs(r.ready_p50_s)} / ${secs(r.ready_p95_s)}`, lost]) {
        const td = tr.insertCell(); td.textContent = v;
      }
      if (r.score < 0.8) tr.className = "bad";
      return tr;
    }));
    $("reliability-note").textContent = rows.length ? "pools without a record score 0.9" : "no deliveries recorded yet";
  } catch (e) {
    $("reliability-note").textContent = String(e.message || e);
  }
}

// --- events ---------------------------------------------------------------------------------
function summary(kind, e) {
  if (kind === "capacity") {
    const spec = (e.pool && e.pool.spec) || null;
    return `${e.region}/${e.provider} ${e.pool_id}` + (spec ? ` ${spec.units}× ${spec.model}` : "") +
      (e.free !== undefined ? ` free ${e.free}` : "") + (e.reason ? ` (${e.reason})` : "");
  }
  if (kind === "alloc") {
    const l = e.lease || {};
    return `${l.tenant} ${l.units}× ${l.model} on ${l.region}/${l.pool_id} ${l.billing}` + (e.reason ? ` (${e.reason})` : "");
  }
  if (kind === "request") {
    return `${e.tenant} ${e.request_id}` + (e.units ? ` ${e.units} units` : "") +
      (e.reasons && e.reasons.length ? ` — ${e.reasons.join("; ")}` : "");
  }
  if (kind === "billing") return `${e.tenant} ` + (e.period ? e.period : `spent ${e.spent} of ${e.budget} ${e.currency}`);
  return "";
}

function addEvent(env) {
  const e = env.event;
  const li = document.createElement("li");
  li.className = env.kind + (BAD.some((b) => e.type.includes(b)) ? " bad" : "");
  li.dataset.type = e.type;
  li.dataset.kind = env.kind;
  const time = new Date(e.at);
  li.innerHTML = `<span class="t"></span><span class="k"></span><span class="s"></span>`;
  li.children[0].textContent = isNaN(time) ? "" : time.toLocaleTimeString();
  li.children[1].textContent = e.type;
  li.children[2].textContent = summary(env.kind, e);
  li.title = JSON.stringify(e);
  const list = $("events");
  list.prepend(li);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
  state.events += 1;
  $("event-count").textContent = String(state.events);
}

function soon(name, ms, fn) {
  // at most one pending refresh per kind: a steady stream of events must not keep
  // pushing it back (a debounce would starve), and a burst costs one re-read
  if (state.timers[name]) return;
  state.timers[name] = setTimeout(() => { state.timers[name] = null; fn().catch(onError); }, ms);
}

function connect() {
  if (state.source) state.source.close();
  const params = new URLSearchParams({ key: state.key });
  params.set("since", state.lastId || "15m");  // first time: the last quarter hour; later: where we were
  const source = new EventSource("/v1/events?" + params.toString());
  state.source = source;
  source.addEventListener("ready", (m) => { state.lastId = m.lastEventId || state.lastId; setStatus(true, "live"); });
  source.addEventListener("revoked", () => { source.close(); logout("the key was revoked"); });
  source.onmessage = (m) => {
    state.lastId = m.lastEventId || state.lastId;
    const env = JSON.parse(m.data);
    addEvent(env);
    soon("capacity", 150, refreshCapacity);
    if (env.kind === "billing" || (env.kind === "alloc" && env.event.type !== "lease.granted")) soon("spend", 1500, refreshSpend);
    if (env.kind === "alloc" && ["lease.ready", "lease.failed", "lease.lost"].includes(env.event.type)) {
      soon("reliability", 2500, refreshReliability);  // the broker's record follows the event within a moment
    }
  };
  source.onerror = () => {
    setStatus(false, "reconnecting…");
    if (source.readyState === EventSource.CLOSED) {  // the browser gave up (e.g. a 401): try again ourselves
      setTimeout(() => { if (state.source === source) connect(); }, 3000);
    }
  };
}

function onError(e) {
  if (e && e.status === 401) { logout("key refused: " + e.message); return; }
  setStatus(false, String(e && e.message ? e.message : e));
}

function logout(message) {
  sessionStorage.removeItem(KEY_SLOT);
  state.key = null;
  if (state.source) state.source.close();
  for (const t of Object.values(state.timers)) { clearTimeout(t); clearInterval(t); }
  $("board").hidden = true; $("forget").hidden = true; $("login").hidden = false;
  $("login-error").textContent = message || "";
  setStatus(false, "not connected");
}

async function start() {
  state.key = takeKeyFromUrl();
  if (!state.key) { logout(""); return; }
  try {
    state.config = await (await fetch("/console/config")).json();
    await refreshCapacity();
  } catch (e) { onError(e); if (!state.key) return; }
  $("login").hidden = true; $("board").hidden = false; $("forget").hidden = false;
  connect();
  refreshSpend();
  refreshReliability();
  state.timers.reliability = setInterval(refreshReliability, 10000);
  state.timers.poll = setInterval(() => refreshCapacity().catch(onError), 5000);
  state.timers.spend = setInterval(refreshSpend, 15000);
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY_SLOT, $("key").value.trim());
  $("key").value = "";
  start();
});
$("forget").addEventListener("click", () => logout(""));
start();
