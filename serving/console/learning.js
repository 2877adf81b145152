// Learning (admins): start a consolidation and follow it live, the schedule, every adapter
// version with its gate figures, verdict and parent, and activate or roll back (confirmed first);
// the learning benchmark's reports with their plots.

import { api } from "./api.js";
import { refreshEngine } from "./console.js";
import { $, clone, confirmAction, figure, fill, say, slot, when } from "./ui.js";

const RUNNING = new Set(["queued", "running"]); // a cycle in these states is not finished
const POLL_MS = 500; // how often a running cycle is asked for its progress
const GATE = [ // the gate's figures in a version's metrics, and what each means
  ["gate_efficacy", "efficacy", "new corrections answered right"],
  ["gate_paraphrase", "paraphrase", "the same, rephrased"],
  ["gate_retention", "retention", "earlier corrections kept"],
  ["gate_negative_flips", "negative flips", "earlier corrections lost"],
  ["gate_locality_token", "token locality", "unrelated answers' tokens kept"],
];
const PLOT_NAMES = { // what each plot of a report shows, as its alternative text
  "accuracy_per_cycle.png": "Accuracy per cycle",
  "first_cycle_over_time.png": "The first cycle's corrections over later cycles",
  "neighbourhood.png": "The corrected questions and their subjects' neighbours, per tier",
};
let following = null; // the id of the cycle being followed
let plotUrls = []; // object URLs of the plots shown, released when the reports are drawn again

export function init() {
  $("#consolidate").addEventListener("click", consolidate);
  $("#rollback").addEventListener("click", rollback);
}

export async function show() {
  const cycles = await loadCycles();
  await loadAdapters(cycles);
  const running = cycles?.find((c) => RUNNING.has(c.status));
  if (running) follow(running);
  await loadReports();
}

/** The learning benchmark's reports: title, records and cycle size, and each plot (fetched with the key). */
async function loadReports() {
  const list = await loaded("/v1/reports", "#reports-status", "Reports");
  if (!list) return;
  for (const url of plotUrls) URL.revokeObjectURL(url);
  plotUrls = [];
  say($("#reports-status"), "");
  $("#reports-empty").hidden = list.data.length > 0;
  $("#reports").replaceChildren(...list.data.map(report));
}

function report(x) {
  const node = clone("t-report");
  const parts = [x.split ? `split ${x.split}` : null, x.n != null ? `N=${x.n}` : null,
                 x.cycle_every != null ? `K=${x.cycle_every} (a cycle every ${x.cycle_every} corrections)` : null,
                 x.engine, when(x.created_at)];
  fill(node, { title: x.title, meta: parts.filter(Boolean).join(" · ") });
  node.dataset.report = x.name;
  const plots = node.querySelector(".plots");
  for (const plot of x.plots) {
    const frame = document.createElement("figure");
    const image = document.createElement("img");
    image.alt = `${PLOT_NAMES[plot.name] ?? plot.name} (${x.name})`;
    const caption = document.createElement("figcaption");
    caption.textContent = PLOT_NAMES[plot.name] ?? plot.name;
    frame.append(image, caption);
    plots.append(frame);
    api.blob(plot.url).then((blob) => {
      const url = URL.createObjectURL(blob);
      plotUrls.push(url);
      image.src = url;
    }).catch((e) => {
      caption.textContent = `${caption.textContent}: not loaded (${e.message})`;
    });
  }
  return node;
}

async function loadCycles() {
  try {
    const list = await api.get("/v1/consolidations");
    const s = list.schedule;
    const parts = [s.every ? `every ${s.every}` : "no schedule", s.after_corrections ? `after ${s.after_corrections} corrections` : null,
                   s.next_run ? `next run ${when(s.next_run)}` : null];
    $("#schedule").textContent = `Schedule: ${parts.filter(Boolean).join(" · ")}`;
    $("#cycles-empty").hidden = list.data.length > 0;
    $("#cycles tbody").replaceChildren(...list.data.slice(0, 20).map((c) => {
      const row = document.createElement("tr");
      for (const text of [c.id, c.trigger, c.status, c.adapter ?? "–", c.n_corrections ?? "–", c.message ?? "",
                          when(c.finished_at)]) {
        const cell = document.createElement("td");
        cell.textContent = String(text);
        row.append(cell);
      }
      return row;
    }));
    return list.data;
  } catch (e) {
    say($("#adapters-status"), `Cycles could not be loaded: ${e.message}`, "error");
    return [];
  }
}

/** GET `path`; null once `status` says that `what` could not be loaded. */
async function loaded(path, status, what) {
  try {
    return await api.get(path);
  } catch (e) {
    say($(status), `${what} could not be loaded: ${e.message}`, "error");
    return null;
  }
}

async function loadAdapters(cycles) {
  const list = await loaded("/v1/adapters", "#adapters-status", "Versions");
  if (!list) return;
  const cycleOf = new Map(cycles.filter((c) => c.adapter_version != null).map((c) => [c.adapter_version, c]));
  $("#serving").textContent = list.active ?? "the base model";
  $("#rollback").disabled = !list.active;
  const versions = [...list.data].sort((a, b) => b.version - a.version).map((v) => version(v, cycleOf.get(v.version)));
  const base = clone("t-version");
  fill(base, { name: "base model", status: "", active: list.active ? "" : "serving", parent: "the model as shipped",
               when: "", verdict: "" });
  base.querySelector(".gate").remove();
  $("#timeline").replaceChildren(...versions, base);
}

function version(v, cycle) {
  const node = clone("t-version");
  fill(node, {
    name: v.name,
    status: v.status,
    active: v.active ? "serving" : "",
    parent: v.parent ? `from ratchet-v${v.parent}` : "from the base model",
    when: `· ${when(v.created_at)}`,
    verdict: cycle?.message ?? "",
  });
  slot(node, "status").dataset.state = v.status;
  const gate = node.querySelector(".gate");
  const measured = GATE.filter(([k]) => typeof v.metrics?.[k] === "number");
  if (measured.length === 0) {
    gate.replaceWith(Object.assign(document.createElement("p"), { className: "hint", textContent: "No gate figures: the gate was off." }));
  }
  for (const [k, label, meaning] of measured) {
    const term = document.createElement("dt");
    term.textContent = label;
    term.title = meaning;
    const value = document.createElement("dd");
    value.textContent = figure(v.metrics[k]);
    value.dataset.metric = k;
    gate.append(term, value);
  }
  const activate = node.querySelector('[data-act="activate"]');
  activate.hidden = v.active || !["promoted", "candidate"].includes(v.status);
  activate.textContent = `Activate ${v.name}`;
  activate.addEventListener("click", async () => {
    if (!await confirmAction(`Serve ${v.name} as ratchet from now on? Requests already running finish on the current version.`,
                             `Activate ${v.name}`)) return;
    await change(() => api.post(`/v1/adapters/${v.version}/activate`));
  });
  return node;
}

async function rollback() {
  const serving = $("#serving").textContent;
  if (!await confirmAction(`Roll back from ${serving} to the version before it (or the base model)?`, "Roll back")) return;
  await change(() => api.post("/v1/adapters/rollback"));
}

async function change(call) {
  try {
    const result = await call();
    say($("#adapters-status"), `Now serving ${result.active ?? "the base model"}.`, "ok");
  } catch (e) {
    say($("#adapters-status"), `Not changed: ${e.message}`, "error");
  }
  await loadAdapters(await loadCycles());
  refreshEngine();
}

async function consolidate() {
  const button = $("#consolidate");
  button.disabled = true;
  try {
    follow(await api.post("/v1/consolidations"));
  } catch (e) {
    button.disabled = false;
    say($("#cycle-message"), `Not started: ${e.message}`, "error");
    $("#cycle").hidden = false;
  }
}

/** Show a cycle's progress, asking for it every POLL_MS until it ends. */
async function follow(cycle) {
  if (following === cycle.id) return;
  following = cycle.id;
  $("#consolidate").disabled = true;
  $("#cycle").hidden = false;
  for (;;) {
    $("#cycle-label").textContent = `Consolidation ${cycle.id}: ${cycle.status}`;
    $("#cycle-progress").value = cycle.progress ?? 0;
    say($("#cycle-message"), cycle.message ?? cycle.status, cycle.status === "failed" ? "error" : "");
    if (!RUNNING.has(cycle.status)) break;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    try {
      cycle = await api.get(`/v1/consolidations/${cycle.id}`);
    } catch {
      continue; // a restart or a lost connection: keep asking
    }
  }
  following = null;
  $("#consolidate").disabled = false;
  await loadAdapters(await loadCycles());
  refreshEngine();
}
