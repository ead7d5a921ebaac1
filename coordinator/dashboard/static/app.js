// The ddm coordinator's dashboard: polls /api/status and /api/events and redraws the tables.
// Every string from the server enters the page as a text node (Element.append with a string,
// textContent), never as markup, so a name or reason holding tags is shown as those tags.
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const knownKinds = new Set();
const knownIslands = new Map(); // island id -> name

function $(id) {
  return document.getElementById(id);
}

// An element with attributes and children (strings become text nodes).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function fill(tableId, rows) {
  $(tableId).querySelector("tbody").replaceChildren(...rows);
}

function number(value, digits) {
  if (value === null || value === undefined) return "";
  return Number(value).toLocaleString(undefined, { maximumFractionDigits: digits });
}

function ago(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}

function bar(step, steps) {
  const wrap = el("div", { class: "bar" });
  const shown = steps ? Math.min(step, steps) : 0;
  wrap.append(
    el("progress", { max: String(steps || 1), value: String(shown) }),
    el("span", { class: "bar-label" }, steps ? `${step}/${steps}` : `${step}`),
  );
  return wrap;
}

// A loss curve as an inline SVG polyline: x is the step (0 to the run's steps), y the loss.
function curve(points, steps) {
  const width = 160;
  const height = 40;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", String(height));
  svg.setAttribute("class", "curve");
  if (points.length < 2) return svg;
  const losses = points.map((p) => p[1]);
  const lo = Math.min(...losses);
  const hi = Math.max(...losses);
  const span = hi - lo || 1;
  const xMax = Math.max(steps || 0, points[points.length - 1][0]) || 1;
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute(
    "points",
    points
      .map(([s, l]) => `${((s / xMax) * (width - 2) + 1).toFixed(1)},${(height - 2 - ((l - lo) / span) * (height - 4)).toFixed(1)}`)
      .join(" "),
  );
  svg.append(line);
  const title = document.createElementNS(SVG, "title");
  title.textContent = `loss ${hi.toFixed(4)} → ${losses[losses.length - 1].toFixed(4)} over ${points.length} points`;
  svg.append(title);
  return svg;
}

function islandState(island) {
  if (island.revoked) return el("span", { class: "state revoked" }, "revoked");
  return island.alive ? el("span", { class: "state alive" }, "alive") : el("span", { class: "state silent" }, "silent");
}

function islandName(id) {
  if (!id) return "";
  const name = knownIslands.get(id);
  return name ? `${name} (${id})` : id;
}

function drawSummary(status) {
  const c = status.coordinator;
  const data = c.mode === "siloed" ? "siloed data" : `dataset ${c.dataset}`;
  const latent = c.latent ? `, latent ${c.latent.shape.join("x")}` : "";
  const dp = c.require_dp_epsilon !== null ? `, signs only DP experts (ε ≤ ${c.require_dp_epsilon})` : "";
  $("summary").replaceChildren(
    el("span", {}, `${c.mode} mode, ${data}; ${c.experts} experts of preset ${c.model_preset}, ` +
      `${c.steps_per_expert} steps each${latent}${dp}`),
    el("br"),
    el("span", { class: "muted" }, `signing key ${c.key_fingerprint}`),
  );
}

function drawIslands(islands) {
  for (const i of islands) knownIslands.set(i.id, i.name);
  fill(
    "islands",
    islands.map((i) =>
      el(
        "tr",
        { "data-island": i.id },
        el("td", { class: "name" }, i.name),
        el("td", { class: "mono" }, i.id),
        el("td", {}, i.role),
        el("td", {}, islandState(i)),
        el("td", {}, ago(i.seconds_since_seen)),
        el("td", { class: "num" }, number(i.images_per_second, 0)),
      ),
    ),
  );
}

function drawExperts(experts) {
  fill(
    "experts",
    experts.map((e) =>
      el(
        "tr",
        { "data-expert": String(e.id), "data-step": String(e.step), "data-state": e.state },
        el("td", {}, String(e.id)),
        el("td", {}, String(e.cluster_id)),
        el("td", {}, el("span", { class: `state ${e.state}` }, e.state)),
        el("td", {}, islandName(e.island_id)),
        el("td", {}, bar(e.step, e.steps)),
        el("td", { class: "num" }, e.loss === null ? "" : e.loss.toFixed(4)),
        el("td", {}, curve(e.curve || [], e.steps)),
        el("td", { class: "num" }, number(e.images_per_second, 0)),
        el("td", {}, e.privacy ? `ε ${e.privacy.epsilon.toPrecision(3)}, δ ${e.privacy.delta.toPrecision(2)}` : ""),
      ),
    ),
  );
}

const ENDED_LEASES = 20; // ended leases shown beside the active ones, newest first

function drawLeases(leases) {
  const newest = leases.slice().reverse();
  const shown = newest.filter((l) => l.state === "active");
  shown.push(...newest.filter((l) => l.state !== "active").slice(0, ENDED_LEASES));
  fill(
    "leases",
    shown.map((l) =>
      el(
        "tr",
        {},
        el("td", { class: "mono" }, l.id),
        el("td", {}, String(l.expert_id)),
        el("td", {}, islandName(l.island_id)),
        el("td", {}, l.state),
        el("td", {}, l.seconds_left !== null ? `in ${Math.round(l.seconds_left)} s` : l.deadline),
      ),
    ),
  );
}

function drawRouter(status) {
  const r = status.router;
  const e = status.ensemble;
  const parts = [el("span", {}, `router: ${r.state} `)];
  if (r.steps !== null) parts.push(bar(r.step, r.steps));
  else parts.push(el("span", { class: "muted" }, `(${status.coordinator.router_budget}, chosen at assembly)`));
  parts.push(el("span", {}, `  ensemble: ${e.state}`));
  if (e.reason) parts.push(el("span", { class: "reason" }, `: ${e.reason}`));
  $("router").replaceChildren(...parts);
  fill(
    "ensembles",
    status.ensembles.map((x) =>
      el(
        "tr",
        {},
        el("td", {}, String(x.id)),
        el("td", {}, x.state),
        el("td", {}, String(x.experts)),
        el("td", {}, (x.updated || "").replace("+00:00", "")),
        el("td", { class: "mono" }, x.manifest_sha256),
      ),
    ),
  );
}

function drawSamples(ensembles) {
  const latest = ensembles.find((x) => x.state === "published");
  const figure = $("samples");
  const shown = figure.querySelector("img");
  if (!latest) {
    figure.replaceChildren(el("figcaption", { id: "samples-caption" }, "no ensemble is published yet"));
    return;
  }
  if (!latest.sample_grid) {
    figure.replaceChildren(
      el("figcaption", { id: "samples-caption" }, `ensemble ${latest.id}: drawing its samples…`),
    );
    return;
  }
  const src = `/samples/${encodeURIComponent(latest.sample_grid)}`;
  if (shown && shown.getAttribute("src") === src) return;
  figure.replaceChildren(
    el("img", { src, alt: `samples of ensemble ${latest.id}`, id: "sample-grid" }),
    el("figcaption", { id: "samples-caption" }, `ensemble ${latest.id}, manifest ${latest.manifest_sha256.slice(0, 16)}…`),
  );
}

function syncSelect(select, values, label) {
  const chosen = select.value;
  const options = [el("option", { value: "" }, "all")];
  for (const [value, text] of values) options.push(el("option", { value }, label ? label(value, text) : text));
  select.replaceChildren(...options);
  select.value = chosen;
}

function detailText(detail) {
  return Object.entries(detail)
    .map(([k, v]) => {
      const text = typeof v === "string" ? v : JSON.stringify(v);
      return `${k}=${/^[0-9a-f]{64}$/.test(text) ? text.slice(0, 12) : text}`;
    })
    .join(" ");
}

async function drawEvents() {
  const kind = $("event-kind").value;
  const island = $("event-island").value;
  const limit = $("event-limit").value;
  const query = new URLSearchParams({ limit });
  if (kind) query.set("kind", kind);
  if (island) query.set("island", island);
  const events = await get(`/api/events?${query}`);
  if (events === null) return;
  for (const e of events) knownKinds.add(e.kind);
  syncSelect($("event-kind"), [...knownKinds].sort().map((k) => [k, k]));
  syncSelect($("event-island"), [...knownIslands.entries()], (id, name) => `${name} (${id})`);
  fill(
    "events",
    events
      .slice()
      .reverse()
      .map((e) =>
        el(
          "tr",
          { "data-kind": e.kind },
          el("td", {}, e.at.replace("+00:00", "")),
          el("td", {}, e.kind),
          el("td", {}, islandName(e.island_id)),
          el("td", {}, e.expert_id === null ? "" : String(e.expert_id)),
          el("td", { class: "detail" }, detailText(e.detail)),
        ),
      ),
  );
}

async function get(url) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) {
    window.location.assign("/login");
    return null;
  }
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

async function refresh() {
  try {
    const status = await get("/api/status");
    if (status === null) return;
    drawSummary(status);
    drawIslands(status.islands);
    drawExperts(status.experts);
    drawLeases(status.leases);
    drawRouter(status);
    drawSamples(status.ensembles);
    await drawEvents();
    $("freshness").textContent = `updated ${new Date().toLocaleTimeString()}`;
    $("freshness").className = "muted";
  } catch (error) {
    $("freshness").textContent = `cannot reach the coordinator (${error.message}); retrying`;
    $("freshness").className = "error";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const id of ["event-kind", "event-island", "event-limit"]) $(id).addEventListener("change", drawEvents);
  refresh();
  setInterval(refresh, POLL_MS);
});
