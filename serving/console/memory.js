// Memory: the corrections this key may see, newest first or nearest to a search, each with its
// state (in memory only, consolidated into a version, retracted); retract, and (admins) confirm.

import { api } from "./api.js";
import { $, clone, confirmAction, fill, say, slot, when } from "./ui.js";

const PAGE = 20; // memories fetched at a time
const EMPTY = { // what an empty list says, by the state shown
  live: "No memories yet. Correct an answer in Chat, or teach a failed one in Failures: it shows up here at once.",
  retracted: "No retracted memories.",
  all: "No memories yet.",
};
let session;
let query = "";
let offset = 0;

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
  $("#memory-state").addEventListener("change", () => {
    query = "";
    $("#memory-query").value = "";
    load(true);
  });
  $("#memory-user").addEventListener("change", () => load(true));
}

export async function show() {
  for (const node of document.querySelectorAll("#view-memory [data-admin]")) node.hidden = !session.admin;
  await load(true);
}

async function load(fresh) {
  const list = $("#memory-list");
  const status = $("#memory-status");
  if (fresh) offset = 0;
  const user = session.admin ? $("#memory-user").value.trim() : "";
  let page;
  try {
    page = (query
      ? await api.get("/v1/memories", { query, limit: PAGE, user })
      : await api.get("/v1/memories", { limit: PAGE, offset, state: $("#memory-state").value, user })).data;
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
  $("#memory-empty").textContent = EMPTY[$("#memory-state").value];
  $("#memory-empty").hidden = $("#memory-list").children.length > 0 || Boolean(query);
}

/** What became of a memory, as the API says: in memory only, in a version's weights, or retracted. */
function state(m) {
  if (m.state === "retracted") return m.adapter ? `retracted (was in ${m.adapter})` : "retracted";
  if (m.state === "weights") return m.adapter ? `consolidated into ${m.adapter}` : `consolidated in cycle ${m.consolidated_in}`;
  return "in memory only";
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
  slot(node, "state").dataset.state = m.state;
  // An untrusted user's correction stays in their own memory until an admin confirms it.
  const waiting = !m.trusted && m.state === "memory";
  slot(node, "trust").textContent = waiting ? "awaiting an admin's confirmation" : "";
  const note = slot(node, "note");
  const confirm = node.querySelector('[data-act="confirm"]');
  confirm.hidden = !session.admin || !waiting;
  node.querySelector('[data-act="retract"]').hidden = m.state === "retracted";
  confirm.addEventListener("click", async () => {
    try {
      const confirmed = await api.post(`/v1/memories/${m.id}/confirm`);
      confirm.hidden = true;
      slot(node, "trust").textContent = "";
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
      const retracted = await api.delete(`/v1/memories/${m.id}`);
      if ($("#memory-state").value === "live") node.remove();
      else node.replaceWith(card(retracted));
      say($("#memory-status"), `Memory #${m.id} retracted: it is no longer used.`, "ok");
      empty();
      $("#memory-query").focus();
    } catch (e) {
      note.textContent = `Not retracted: ${e.message}`;
    }
  });
  return node;
}
