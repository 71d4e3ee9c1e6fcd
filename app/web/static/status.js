// ondemand status page: polls GET /api/cache/status every second and draws what an operator needs.
// Vanilla JS, no dependencies, no build step. Every server-provided string goes through textContent.
"use strict";

(() => {
  // Relative to this script (<base>/static/status.js), so the page works under any prefix the app is
  // mounted at (/ondemand/), whatever the page's own URL looks like.
  const STATUS_URL = new URL("../api/cache/status", document.currentScript.src).href;
  const HISTORY_URL = new URL("../api/cache/history", document.currentScript.src).href;
  const POLL_MS = 1000;
  const UNAUTHORIZED_POLL_MS = 5000;
  const TIMEOUT_MS = 5000;
  const WINDOW_S = 300; // the chart's time window
  const TOKEN_KEY = "ondemand.apiToken";

  const $ = (id) => document.getElementById(id);

  // -- the bearer token: ?token= (then removed from the URL) or the form; kept in sessionStorage ----------

  let memoryToken = "";
  const storage = (() => {
    try {
      const s = window.sessionStorage;
      s.getItem(TOKEN_KEY);
      return s;
    } catch (_err) {
      return null; // storage disabled: keep the token in memory for this page only
    }
  })();

  function getToken() {
    return storage ? storage.getItem(TOKEN_KEY) || "" : memoryToken;
  }

  function setToken(value) {
    if (storage) {
      if (value) storage.setItem(TOKEN_KEY, value);
      else storage.removeItem(TOKEN_KEY);
    } else {
      memoryToken = value;
    }
  }

  function takeTokenFromUrl() {
    const url = new URL(window.location.href);
    if (!url.searchParams.has("token")) return;
    setToken(url.searchParams.get("token") || "");
    url.searchParams.delete("token");
    // Keep the token out of the history, bookmarks and anything copied from the address bar.
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }

  function showTokenForm(message) {
    const form = $("token-form");
    form.hidden = false;
    if (message) $("token-hint").textContent = message;
    $("token-input").focus();
  }

  // -- formatting ------------------------------------------------------------------------------------

  const pad2 = (n) => String(n).padStart(2, "0");

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
    const s = Math.max(0, seconds);
    if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    const sec = Math.floor(s % 60);
    if (d) return `${d}d ${h}h ${pad2(m)}m`;
    if (h) return `${h}h ${pad2(m)}m ${pad2(sec)}s`;
    return `${m}m ${pad2(sec)}s`;
  }

  function fmtNum(v) {
    if (v === null || v === undefined || !Number.isFinite(v)) return "—";
    const abs = Math.abs(v);
    const digits = abs >= 100 || Number.isInteger(v) ? 0 : abs >= 10 ? 1 : 2;
    return v.toLocaleString("en-US", { maximumFractionDigits: digits });
  }

  const fmtPct = (r) => (r === null || r === undefined || !Number.isFinite(r) ? "—" : `${(r * 100).toFixed(1)} %`);
  const orDash = (v) => (v === null || v === undefined || v === "" ? "—" : String(v));

  function setText(id, value) {
    const el = $(id);
    const text = orDash(value);
    if (el.textContent !== text) el.textContent = text;
  }

  function setBadge(id, state) {
    const el = $(id);
    el.dataset.state = state || "unknown";
    el.textContent = state ? state.replace("_", "-") : "unknown";
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  // -- connection indicator --------------------------------------------------------------------------

  let conn = { state: "connecting", message: "connecting…" };
  let lastOkAt = null; // performance.now() seconds of the last good status

  function setConn(state, message) {
    conn = { state, message };
    renderConn();
  }

  function renderConn() {
    const now = performance.now() / 1000;
    let { state, message } = conn;
    if (state === "live" && lastOkAt !== null) {
      const age = now - lastOkAt;
      if (age > 3) state = "stale";
      message = `live · updated ${age.toFixed(age < 10 ? 1 : 0)} s ago`;
    }
    $("conn").dataset.state = state;
    setText("conn-text", message);
  }

  // -- derived series --------------------------------------------------------------------------------

  // {t, ops, hit, cmds, state}: t in performance.now() seconds; hit null when nothing was read; state the
  // service's readiness (ready, degraded, unavailable) at t.
  const samples = [];
  let previous = null;
  let latest = { ops: null, hit: null, cmds: null };

  function totals(doc) {
    let ops = 0;
    let hits = 0;
    let reads = 0;
    for (const ns of Object.values((doc.dispatcher && doc.dispatcher.namespaces) || {})) {
      const h = ns.hits || 0;
      const d = ns.durable_hits || 0;
      const m = ns.misses || 0;
      hits += h;
      reads += h + d + m;
      ops += h + d + m + (ns.writes || 0) + (ns.deletes || 0);
    }
    const uptime = Number(doc.uptime_seconds) || 0;
    return {
      ops,
      hits,
      reads,
      commands: (doc.redis && doc.redis.counters && doc.redis.counters.commands) || 0,
      uptime,
      startedAt: Date.now() / 1000 - uptime, // tells a restarted (or another worker) process apart
    };
  }

  // The same rule as the server's /readyz: Redis is down when its breaker is not closed or its server
  // failed; unavailable when no store can take a write.
  function readiness(doc) {
    const redis = doc.redis || {};
    const breaker = ((doc.dispatcher || {}).breaker || {}).state;
    const redisOk = breaker === "closed" && redis.state !== "failed" && redis.state !== "disabled";
    const durable = (doc.storages || {}).durable;
    const durableOk = durable ? durable.state !== "down" : null;
    if (redisOk && durableOk !== false) return "ready";
    return redisOk || durableOk ? "degraded" : "unavailable";
  }

  let historyPoints = 0;

  // The server's history (one sample every few seconds, the last minutes): what happened before this page
  // was opened. Its times are the server's clock; the chart's are performance.now().
  async function loadHistory(headers) {
    try {
      const resp = await fetch(HISTORY_URL, { headers, cache: "no-store" });
      if (!resp.ok) return;
      const history = await resp.json();
      const offset = performance.now() / 1000 - history.now;
      const list = history.samples || [];
      const loaded = [];
      for (let i = 1; i < list.length; i++) {
        const a = list[i - 1];
        const b = list[i];
        const dt = b.t - a.t;
        if (!(dt > 0) || b.ops < a.ops || b.reads < a.reads) continue;
        const reads = b.reads - a.reads;
        loaded.push({
          t: b.t + offset,
          ops: (b.ops - a.ops) / dt,
          hit: reads > 0 ? (b.hits - a.hits) / reads : null,
          cmds: b.commands >= a.commands ? (b.commands - a.commands) / dt : null,
          state: b.readiness,
          span: dt,
        });
      }
      const first = samples.length ? samples[0].t : Infinity;
      samples.unshift(...loaded.filter((s) => s.t < first));
      historyPoints = loaded.length;
      drawChart();
    } catch (_err) {
      // No history (an older server, a network error): the chart starts from this page's own polls.
    }
  }

  function addSample(doc, now) {
    const cur = { ...totals(doc), clientT: now };
    const prev = previous;
    previous = cur;
    if (!prev) return;
    const sameProcess = Math.abs(cur.startedAt - prev.startedAt) < 2 && cur.ops >= prev.ops && cur.reads >= prev.reads;
    if (!sameProcess) return; // counters restarted: start a new baseline, draw no bogus spike
    const serverDt = cur.uptime - prev.uptime;
    const dt = serverDt > 0.05 ? serverDt : cur.clientT - prev.clientT;
    if (!(dt > 0)) return;
    const reads = cur.reads - prev.reads;
    const sample = {
      t: now,
      ops: (cur.ops - prev.ops) / dt,
      hit: reads > 0 ? (cur.hits - prev.hits) / reads : null,
      cmds: cur.commands >= prev.commands ? (cur.commands - prev.commands) / dt : null,
      state: readiness(doc),
      span: cur.clientT - prev.clientT,
    };
    samples.push(sample);
    latest = sample;
    while (samples.length && samples[0].t < now - WINDOW_S - 2) samples.shift();
  }

  // -- the chart, drawn by hand -----------------------------------------------------------------------

  function niceMax(v) {
    const exp = 10 ** Math.floor(Math.log10(v));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (step * exp >= v) return step * exp;
    }
    return 10 * exp;
  }

  function drawChart() {
    const canvas = $("chart");
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);

    const css = getComputedStyle(document.documentElement);
    const color = (name) => css.getPropertyValue(name).trim();
    const [grid, muted, opsColor, hitColor] = ["--grid", "--muted", "--ops", "--hit"].map(color);
    const pad = { l: 52, r: 48, t: 10, b: 24 };
    const pw = w - pad.l - pad.r;
    const ph = h - pad.t - pad.b;
    if (pw < 20 || ph < 20) return;

    const now = performance.now() / 1000;
    const x = (t) => pad.l + pw * (1 - (now - t) / WINDOW_S);
    const maxOps = niceMax(Math.max(1, ...samples.map((s) => s.ops)));
    const yOps = (v) => pad.t + ph * (1 - v / maxOps);
    const yHit = (r) => pad.t + ph * (1 - r);

    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = Math.round(pad.t + (ph * i) / 4) + 0.5;
      ctx.strokeStyle = grid;
      ctx.beginPath();
      ctx.moveTo(pad.l, y);
      ctx.lineTo(pad.l + pw, y);
      ctx.stroke();
      ctx.fillStyle = muted;
      ctx.textAlign = "right";
      ctx.fillText(fmtNum(maxOps * (1 - i / 4)), pad.l - 8, y);
      ctx.textAlign = "left";
      ctx.fillText(`${100 - i * 25}%`, pad.l + pw + 8, y);
    }
    ctx.textBaseline = "top";
    ctx.textAlign = "center";
    for (let s = 0; s <= WINDOW_S; s += 60) {
      const gx = Math.round(pad.l + pw * (1 - s / WINDOW_S)) + 0.5;
      ctx.strokeStyle = grid;
      ctx.beginPath();
      ctx.moveTo(gx, pad.t);
      ctx.lineTo(gx, pad.t + ph);
      ctx.stroke();
      ctx.fillStyle = muted;
      ctx.fillText(s === 0 ? "now" : `−${s / 60} min`, gx, pad.t + ph + 6);
    }

    ctx.save();
    ctx.beginPath();
    ctx.rect(pad.l, pad.t - 2, pw, ph + 4);
    ctx.clip();
    const visible = samples.filter((s) => s.t >= now - WINDOW_S - 2);
    // Incidents first, under the lines: each interval the service was not ready, shaded.
    let incidents = 0;
    for (const s of visible) {
      if (!s.state || s.state === "ready") continue;
      incidents += 1;
      ctx.globalAlpha = 0.18;
      ctx.fillStyle = s.state === "unavailable" ? color("--bad") : color("--warn");
      const x0 = x(s.t - (s.span || 1));
      ctx.fillRect(x0, pad.t, Math.max(1, x(s.t) - x0), ph);
      ctx.globalAlpha = 1;
    }
    if (visible.length) {
      // operations per second: a filled area under a line
      ctx.beginPath();
      ctx.moveTo(x(visible[0].t), yOps(0));
      for (const s of visible) ctx.lineTo(x(s.t), yOps(s.ops));
      ctx.lineTo(x(visible[visible.length - 1].t), yOps(0));
      ctx.closePath();
      ctx.globalAlpha = 0.15;
      ctx.fillStyle = opsColor;
      ctx.fill();
      ctx.globalAlpha = 1;
      ctx.beginPath();
      visible.forEach((s, i) => (i ? ctx.lineTo(x(s.t), yOps(s.ops)) : ctx.moveTo(x(s.t), yOps(s.ops))));
      ctx.strokeStyle = opsColor;
      ctx.lineWidth = 2;
      ctx.lineJoin = "round";
      ctx.stroke();

      // hit ratio: a line with gaps where nothing was read; lone points as dots
      ctx.strokeStyle = hitColor;
      ctx.fillStyle = hitColor;
      let run = [];
      const flush = () => {
        if (run.length === 1) {
          ctx.beginPath();
          ctx.arc(x(run[0].t), yHit(run[0].hit), 2.5, 0, 2 * Math.PI);
          ctx.fill();
        } else if (run.length > 1) {
          ctx.beginPath();
          run.forEach((s, i) => (i ? ctx.lineTo(x(s.t), yHit(s.hit)) : ctx.moveTo(x(s.t), yHit(s.hit))));
          ctx.stroke();
        }
        run = [];
      };
      for (const s of visible) {
        if (s.hit === null) flush();
        else run.push(s);
      }
      flush();
    }
    ctx.restore();

    if (!visible.length) {
      ctx.fillStyle = muted;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.font = "13px system-ui, sans-serif";
      ctx.fillText("collecting samples…", pad.l + pw / 2, pad.t + ph / 2);
    }
    canvas.dataset.points = String(samples.length);
    canvas.dataset.historyPoints = String(historyPoints);
    canvas.dataset.incidents = String(incidents);
    canvas.dataset.lastOps = latest.ops === null ? "" : latest.ops.toFixed(3);
  }

  // -- rendering the document ---------------------------------------------------------------------------

  let idle = null; // {deadline (performance.now() seconds), timeout}
  let lastDoc = null;

  function renderIdle() {
    const bar = $("idle-bar");
    if (!idle) {
      setText("idle", "—");
      bar.style.width = "0";
      return;
    }
    const left = Math.max(0, idle.deadline - performance.now() / 1000);
    setText("idle", fmtDuration(left));
    const fraction = idle.timeout > 0 ? Math.min(1, left / idle.timeout) : 0;
    bar.style.width = `${(fraction * 100).toFixed(1)}%`;
    bar.dataset.level = fraction < 0.2 ? "low" : "ok";
  }

  function render(doc, now) {
    const redis = doc.redis || {};
    setBadge("state", redis.state);
    setText("lifecycle", redis.owner && redis.owner !== "self" ? `${redis.lifecycle} (${redis.owner})` : redis.lifecycle);
    setText("pid", redis.pid);
    setText("redis-uptime", fmtDuration(redis.uptime_seconds));
    setText("endpoint", redis.endpoint);
    setText("redis-version", redis.server_version
      || (redis.binary_version ? `${redis.binary_flavour || ""} ${redis.binary_version} (binary)`.trim() : null));
    const problems = [];
    if (redis.last_error) problems.push(redis.last_error);
    if (redis.retry_in !== null && redis.retry_in !== undefined) problems.push(`retry in ${fmtDuration(redis.retry_in)}`);
    $("redis-error").hidden = !problems.length;
    setText("redis-error", problems.join(" · "));
    renderSentinel(redis.sentinel);
    renderCluster(redis);

    if (redis.idle_deadline_in !== null && redis.idle_deadline_in !== undefined) {
      idle = { deadline: now + redis.idle_deadline_in, timeout: redis.idle_timeout };
      setText("idle-note", `stops after ${fmtDuration(redis.idle_timeout)} without a cache operation`);
    } else {
      idle = null;
      setText("idle-note", redis.state === "running"
        ? "not ours to stop: the server is managed elsewhere"
        : "no server running; the next cache operation starts one");
    }
    renderIdle();

    const dispatcher = doc.dispatcher || {};
    const breaker = dispatcher.breaker || {};
    setBadge("breaker", breaker.state);
    setText("breaker-opens", breaker.opens);
    setText("stale-keys", dispatcher.stale_overflow
      ? `${fmtNum(dispatcher.stale_keys_pending)} (overflowed: full purge on recovery)`
      : fmtNum(dispatcher.stale_keys_pending));
    setText("breaker-reason", breaker.last_reason);

    setText("service-uptime", fmtDuration(doc.uptime_seconds));
    const storages = doc.storages || {};
    const describe = (s) => (s ? [s.backend || s.name, s.state].filter(Boolean).join(" · ") : "none");
    setText("cache-store", describe(storages.cache));
    setText("durable-store", describe(storages.durable));
    setText("durable-version", storages.durable ? storages.durable.server_version : null);
    const durableError = storages.durable && storages.durable.state === "down" ? storages.durable.last_error : null;
    $("durable-error").hidden = !durableError;
    setText("durable-error", durableError);
    const commands = redis.counters ? redis.counters.commands : null;
    setText("commands", latest.cmds === null ? fmtNum(commands) : `${fmtNum(commands)} (${fmtNum(latest.cmds)}/s)`);
    const t = totals(doc);
    setText("hit-ratio-total", t.reads ? `${fmtPct(t.hits / t.reads)} of ${fmtNum(t.reads)} reads` : "no reads yet");
    setText("ops-now", latest.ops === null ? "—" : fmtNum(latest.ops));
    setText("hit-now", fmtPct(latest.hit));

    renderPools(redis.pools || {});
    renderNamespaces(dispatcher.namespaces || {});
    renderNear(doc.near_cache);
    renderAside(dispatcher.aside);
    renderPlugins(doc.plugins || []);
    if ($("raw").closest("details").open) $("raw").textContent = JSON.stringify(doc, null, 2);
  }

  // Rows a topology adds to the Redis card (sentinel, cluster), made on the first status that has them:
  // `rows` are [label, id] pairs; the group's dt/dd stay in the card's grid (status.css).
  function topologyRows(groupId, rows) {
    let group = $(groupId);
    if (group) return group;
    group = document.createElement("div");
    group.id = groupId;
    for (const [label, id] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.id = id;
      dd.className = "mono wrap";
      group.append(dt, dd);
    }
    $("endpoint").closest("dl").append(group);
    return group;
  }

  function sentinelRows() {
    return topologyRows("sentinel-rows", [["master", "sentinel-master"], ["sentinels", "sentinel-list"],
      ["failovers", "sentinel-failovers"]]);
  }

  function renderSentinel(sentinel) {
    if (!sentinel) {
      if ($("sentinel-rows")) $("sentinel-rows").hidden = true;
      return;
    }
    sentinelRows().hidden = false;
    setText("sentinel-master", sentinel.master
      ? `${sentinel.master_name} at ${sentinel.master}`
      : `${sentinel.master_name}: none known now`);
    const list = $("sentinel-list");
    const items = (sentinel.sentinels || []).map((s) => {
      const item = document.createElement("span");
      item.className = "sentinel";
      item.dataset.state = s.state;
      item.textContent = `${s.address} ${s.state}${s.subscribed ? " (subscribed)" : ""}`;
      if (s.last_error) item.title = s.last_error;
      return item;
    });
    const text = items.map((i) => i.textContent).join(" · ");
    if (list.dataset.text !== text) {
      list.dataset.text = text;
      list.replaceChildren(...items.flatMap((item, i) => (i ? [document.createTextNode(" · "), item] : [item])));
    }
    const last = sentinel.last_failover;
    setText("sentinel-failovers", last
      ? `${fmtNum(sentinel.failovers)} · last ${last.from} → ${last.to}, ${fmtDuration(Date.now() / 1000 - last.at)} ago`
      : fmtNum(sentinel.failovers));
  }

  // lifecycle.topology = "cluster": the masters, as the default pool's connection sees them.
  function renderCluster(redis) {
    const pipeline = ((redis.pools || {}).default || {}).pipeline || {};
    if (redis.topology !== "cluster" || !pipeline.nodes) {
      if ($("cluster-rows")) $("cluster-rows").hidden = true;
      return;
    }
    topologyRows("cluster-rows", [["topology", "cluster-topology"], ["masters", "cluster-nodes"],
      ["redirects", "cluster-redirects"]]).hidden = false;
    setText("cluster-topology", `cluster, ${pipeline.nodes.length} masters`);
    setText("cluster-nodes", pipeline.nodes
      .map((n) => `${n.address} ${n.state || (n.connected ? "up" : "down")} · ${fmtNum(n.slots)} slots · ${fmtNum(n.commands)} cmds`)
      .join("  |  "));
    setText("cluster-redirects", Object.entries(pipeline.redirects || {})
      .map(([kind, count]) => `${kind} ${fmtNum(count)}`).join(" · "));
  }

  function renderPools(pools) {
    const body = $("pools");
    const names = Object.keys(pools);
    if (!names.length) {
      const tr = document.createElement("tr");
      const td = cell("no pool opened yet", "subtle");
      td.colSpan = 6;
      tr.append(td);
      body.replaceChildren(tr);
      return;
    }
    body.replaceChildren(...names.map((name) => {
      const p = pools[name];
      const tr = document.createElement("tr");
      const inUse = cell("");
      const meter = document.createElement("span");
      meter.className = "meter mini";
      const fill = document.createElement("span");
      fill.className = "fill";
      const used = p.client_connections_in_use || 0;
      fill.style.width = `${p.max_connections ? Math.min(100, (100 * used) / p.max_connections) : 0}%`;
      meter.append(fill);
      inUse.append(meter, `${used} / ${p.max_connections}`);
      const pipe = p.pipeline
        ? `${p.pipeline.connected ? "" : "disconnected · "}${fmtNum(p.pipeline.commands)} / ${fmtNum(p.pipeline.batches)}`
        : "—";
      tr.append(
        cell(name),
        cell(p.open ? "open" : "closed"),
        inUse,
        cell(fmtNum(p.leases)),
        cell(`${fmtDuration(p.idle_seconds)} / ${fmtDuration(p.keep_alive)}`),
        cell(pipe),
      );
      return tr;
    }));
  }

  function renderNamespaces(namespaces) {
    $("namespaces").replaceChildren(...Object.entries(namespaces).map(([name, ns]) => {
      const errors = (ns.cache_errors || 0) + (ns.durable_errors || 0);
      const tr = document.createElement("tr");
      tr.append(
        cell(name),
        cell(fmtNum(ns.hits)),
        cell(fmtNum(ns.durable_hits)),
        cell(fmtNum(ns.misses)),
        cell(fmtNum(ns.writes)),
        cell(fmtNum(ns.dropped_writes), ns.dropped_writes ? "bad" : ""),
        cell(fmtNum(errors), errors ? "bad" : ""),
      );
      return tr;
    }));
  }

  // The get_or_compute card: shown once a namespace has loaded something through it.
  function renderAside(aside) {
    const used = Object.entries((aside && aside.namespaces) || {}).filter(([, a]) => a.loads || a.load_errors);
    $("aside-card").hidden = used.length === 0;
    $("aside").replaceChildren(...used.map(([name, a]) => {
      const tr = document.createElement("tr");
      tr.append(
        cell(name),
        cell(fmtNum(a.loads)),
        cell(a.loads ? `${(a.load_seconds / a.loads * 1000).toFixed(1)} ms` : "—"),
        cell(fmtNum(a.joins)),
        cell(fmtNum(a.lease_waits)),
        cell(fmtNum(a.lease_timeouts), a.lease_timeouts ? "bad" : ""),
        cell(fmtNum(a.stale_served)),
        cell(fmtNum(a.early_refreshes)),
        cell(fmtNum(a.load_errors), a.load_errors ? "bad" : ""),
      );
      return tr;
    }));
  }

  // The near cache card: shown when a namespace keeps one (doc.near_cache is null otherwise).
  function renderNear(near) {
    $("near-card").hidden = !near;
    if (!near) return;
    setBadge("near-state", near.state);
    setText("near-namespaces", (near.namespaces || []).join(", "));
    const reads = (near.hits || 0) + (near.misses || 0);
    setText("near-hits", `${fmtNum(near.hits)} / ${fmtNum(near.misses)}` + (reads ? ` (${fmtPct(near.hits / reads)} hits)` : ""));
    setText("near-entries", `${fmtNum(near.entries)} of at most ${fmtNum(near.max_entries)}`);
    setText("near-bytes", `${fmtNum(near.bytes)} of ${fmtNum(near.max_bytes)} bytes`);
    setText("near-invalidations", fmtNum(near.invalidations));
    const flushes = Object.entries(near.flushes || {}).map(([cause, n]) => `${cause} ${fmtNum(n)}`);
    setText("near-flushes", flushes.length ? flushes.join(" · ") : "none");
    setText("near-bound", `${near.max_silence} s (${near.tracking}; ${fmtNum(near.fresh_connections)} of ${fmtNum(near.connections)} connections fresh)`);
    const refused = Object.entries(near.refused || {}).map(([where, why]) => `${where}: ${why}`);
    $("near-refused").hidden = !refused.length;
    setText("near-refused", refused.length ? `no near cache at ${refused.join(" · ")}` : "");
  }

  let pluginsKey = "";

  function renderPlugins(plugins) {
    const key = plugins.join("\n");
    if (key === pluginsKey) return;
    pluginsKey = key;
    $("plugins").replaceChildren(...plugins.map((name) => {
      const li = document.createElement("li");
      li.textContent = name;
      return li;
    }));
  }

  // -- polling ----------------------------------------------------------------------------------------

  let timer = null;

  function schedule(delay) {
    clearTimeout(timer);
    timer = setTimeout(poll, Math.max(0, delay));
  }

  let historyLoaded = false;

  async function poll() {
    const started = performance.now();
    let next = POLL_MS;
    const abort = new AbortController();
    const timeout = setTimeout(() => abort.abort(), TIMEOUT_MS);
    try {
      const headers = { Accept: "application/json" };
      const token = getToken();
      if (token) headers.Authorization = `Bearer ${token}`;
      const resp = await fetch(STATUS_URL, { headers, cache: "no-store", signal: abort.signal });
      if (resp.status === 401 || resp.status === 403) {
        next = UNAUTHORIZED_POLL_MS;
        const message = resp.status === 401
          ? "This server needs an API token (server.api_token)."
          : "The server rejected this token; enter the right one.";
        setConn("auth", resp.status === 401 ? "API token required" : "API token rejected");
        showTokenForm(message);
        return;
      }
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const doc = await resp.json();
      if (!historyLoaded) {
        historyLoaded = true; // once the status answered (the token, if any, is right)
        await loadHistory(headers);
      }
      const now = performance.now() / 1000;
      lastOkAt = now;
      lastDoc = doc;
      addSample(doc, now);
      render(doc, now);
      drawChart();
      setConn("live", "live");
    } catch (err) {
      const reason = err && err.name === "AbortError" ? "timed out" : (err && err.message) || String(err);
      setConn("error", `cannot reach the server: ${reason}; retrying`);
    } finally {
      clearTimeout(timeout);
      schedule(next - (performance.now() - started));
    }
  }

  function init() {
    takeTokenFromUrl();
    $("token-button").addEventListener("click", () => {
      const form = $("token-form");
      form.hidden = !form.hidden;
      if (!form.hidden) $("token-input").focus();
    });
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      setToken($("token-input").value.trim());
      $("token-input").value = "";
      $("token-form").hidden = true;
      setConn("connecting", "connecting…");
      schedule(0);
    });
    $("token-forget").addEventListener("click", () => {
      setToken("");
      $("token-input").value = "";
      schedule(0);
    });
    $("raw").closest("details").addEventListener("toggle", () => {
      if (lastDoc) $("raw").textContent = JSON.stringify(lastDoc, null, 2);
    });
    window.addEventListener("resize", drawChart);
    setInterval(() => {
      renderConn();
      renderIdle();
    }, 250);
    drawChart();
    poll();
  }

  init();
})();
