// Memory: the corrections this key may see, newest first or nearest to a search, each with its
// state (in memory only, consolidated into a version, retracted); retract, and (admins) confirm.

import { api } from "./api.js";
import { $, clone, confirmAction, fill, say, slot, when } from "./ui.js";

const PAGE = 20; // memories fetched at a time
let session;
let query = "";
let offset = 0;
let adapterOf = new Map(); // cycle id -> the adapter it made (admins only: GET /v1/consolidations)

export function init(shared) {
  session = shared;
  $("#memory-search").addEventListener("submit", (event) => {
    event.preventDefault();
    query = $("#memory-query").value.trim();
    load(true);
  });
  $("#memory-newest").addEventListener("click", () => {
    query = "";
    $("#memory-query").value = "";
    load(true);
  });
  $("#memory-more").addEventListener("click", () => load(false));
}

export async function show() {
  if (session.admin) {
    try {
      const cycles = await api.get("/v1/consolidations");
      adapterOf = new Map(cycles.data.map((c) => [c.id, c.adapter]));
    } catch {
      adapterOf = new Map();
    }
  }
  await load(true);
}

async function load(fresh) {
  const list = $("#memory-list");
  const status = $("#memory-status");
  if (fresh) offset = 0;
  let page;
  try {
    page = (query
      ? await api.get("/v1/memories", { query, limit: PAGE })
      : await api.get("/v1/memories", { limit: PAGE, offset })).data;
  } catch (e) {
    say(status, `Memories could not be loaded: ${e.message}`, "error");
    return;
  }
  const cards = page.map(card);
  if (fresh) list.replaceChildren(...cards);
  else list.append(...cards);
  offset += page.length;
  $("#memory-more").hidden = Boolean(query) || page.length < PAGE;
  const found = page.length ? `${page.length} memor${page.length === 1 ? "y" : "ies"} near “${query}”`
    : `Nothing in memory near “${query}”.`;
  say(status, query ? found : "");
  empty();
}

/** The empty state: shown when the caller has no memory at all (not for a search that found none). */
function empty() {
  $("#memory-empty").hidden = $("#memory-list").children.length > 0 || Boolean(query);
}

function state(m) {
  if (m.retracted_at) return "retracted";
  if (m.consolidated_in == null) return "in memory only";
  const adapter = adapterOf.get(m.consolidated_in);
  return `consolidated in cycle ${m.consolidated_in}${adapter ? ` → ${adapter}` : ""}`;
}

function card(m) {
  const node = clone("t-memory");
  fill(node, {
    question: m.question,
    answer: m.answer,
    state: state(m),
    id: `#${m.id}`,
    who: m.shared ? "shared with everyone" : `for ${m.user}`,
    when: when(m.created_at) + (m.merged ? ` · given ${m.merged + 1} times` : ""),
    score: m.score == null ? "" : `score ${m.score.toFixed(2)}`,
  });
  slot(node, "state").dataset.state = m.retracted_at ? "retracted" : m.consolidated_in == null ? "memory" : "weights";
  const note = slot(node, "note");
  const confirm = node.querySelector('[data-act="confirm"]');
  // The API does not say which corrections are trusted, so admins may vouch for any user's.
  confirm.hidden = !session.admin || m.shared || m.retracted_at || m.consolidated_in != null;
  confirm.addEventListener("click", async () => {
    try {
      const confirmed = await api.post(`/v1/memories/${m.id}/confirm`);
      confirm.hidden = true;
      note.textContent = confirmed.trusted ? "Confirmed: the next consolidation may learn it." : "Confirmed.";
    } catch (e) {
      note.textContent = `Not confirmed: ${e.message}`;
    }
  });
  node.querySelector('[data-act="retract"]').addEventListener("click", async () => {
    const yes = await confirmAction(
      `Retract memory #${m.id} (“${m.question}” → ${m.answer})? It stops being used at once, and the next `
      + "consolidation takes it out of the weights.", "Retract");
    if (!yes) return;
    try {
      await api.delete(`/v1/memories/${m.id}`);
      node.remove();
      say($("#memory-status"), `Memory #${m.id} retracted: it is no longer used.`, "ok");
      empty();
      $("#memory-query").focus();
    } catch (e) {
      note.textContent = `Not retracted: ${e.message}`;
    }
  });
  return node;
}
