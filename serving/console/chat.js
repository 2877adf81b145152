// Chat: threads kept in this tab, answers streamed as they are written, and under each answer
// thumbs up or down, a correction (feedback on its response id), the memories it used and the
// version that answered. A corrected answer is sent as its correction in the thread's history.

import { api, streamChat } from "./api.js";
import { $, clone, fill, slot } from "./ui.js";

const THREADS = "ratchet.threads"; // sessionStorage: [{id, title, turns}], like the key, per tab
const CURRENT = "ratchet.thread"; // sessionStorage: the id of the thread shown
const HISTORY = 40; // earlier messages sent with a question, the latest (as the server trims its own threads)

let threads = [];
let current = null;
let busy = false;

export function init() {
  threads = JSON.parse(sessionStorage.getItem(THREADS) || "[]");
  current = threads.find((t) => t.id === sessionStorage.getItem(CURRENT)) ?? null;
  for (const turn of threads.flatMap((t) => t.turns).filter((t) => t.streaming)) {
    delete turn.streaming; // the page was left while this answer was written
    if (!turn.id) turn.error = "the page was left before the answer came";
  }
  $("#ask").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("#question").value.trim();
    if (text && !busy) {
      $("#question").value = "";
      ask(text);
    }
  });
  $("#question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("#ask").requestSubmit();
    }
  });
  $("#new-thread").addEventListener("click", () => {
    current = null;
    save();
    render();
    $("#question").focus();
  });
}

export async function show() {
  render();
  try {
    const models = await api.get("/v1/models");
    const select = $("#model");
    const chosen = select.value;
    select.replaceChildren(...models.data.map((m) => new Option(m.id, m.id, false, m.id === chosen)));
  } catch {
    // the shell shows the error; the default model still answers
  }
}

function save() {
  sessionStorage.setItem(THREADS, JSON.stringify(threads));
  sessionStorage.setItem(CURRENT, current?.id ?? "");
}

function render() {
  const list = $("#thread-list");
  list.replaceChildren(...threads.map((thread) => {
    const item = clone("t-thread");
    const button = item.querySelector("button");
    button.textContent = thread.title;
    if (thread === current) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => {
      current = thread;
      save();
      render();
    });
    return item;
  }));
  const turns = current?.turns ?? [];
  $("#messages").replaceChildren(...turns.map((turn, i) => (turn.role === "user" ? question(turn) : answer(turn, i))));
  $("#chat-empty").hidden = turns.length > 0;
}

function question(turn) {
  return fill(clone("t-question"), { text: turn.content });
}

/** Ask `text` in the current thread (a new one if none) and stream the answer in. */
async function ask(text) {
  if (!current) {
    current = { id: crypto.randomUUID(), title: text.slice(0, 60), turns: [] };
    threads.unshift(current);
  }
  const thread = current;
  // What the model sees: the thread so far, corrected answers as their corrections, and no
  // exchange that went unanswered.
  const history = thread.turns
    .filter((t, i) => !t.error && !thread.turns[i + 1]?.error)
    .map((t) => ({ role: t.role, content: t.correction ?? t.content }))
    .slice(-HISTORY);
  thread.turns.push({ role: "user", content: text });
  const turn = { role: "assistant", content: "", id: null, adapter: null, memories: [], streaming: true };
  thread.turns.push(turn);
  save();
  render();
  const node = $("#messages").lastElementChild;
  node.classList.add("streaming");
  node.setAttribute("aria-busy", "true");
  busy = true;
  $("#send").disabled = true;
  try {
    const body = { model: $("#model").value, memory: $("#use-memory").checked,
                   messages: [...history, { role: "user", content: text }] };
    for await (const chunk of streamChat(body)) {
      turn.id = chunk.id;
      turn.content += chunk.choices[0]?.delta?.content ?? "";
      if (chunk.ratchet) {
        turn.memories = chunk.ratchet.memories ?? [];
        turn.adapter = chunk.ratchet.adapter ?? null;
      }
      slot(node, "text").textContent = turn.content;
    }
  } catch (e) {
    turn.error = e.message;
  } finally {
    delete turn.streaming;
    busy = false;
    $("#send").disabled = false;
    save();
    if (current !== thread) return;
    if (node.isConnected) node.replaceWith(answer(turn, thread.turns.indexOf(turn)));
    else render(); // the thread was left and opened again while the answer came
  }
}

/** An answer with what it used and what can be done with it. */
function answer(turn, index) {
  const node = clone("t-answer");
  const note = slot(node, "note");
  if (turn.error) {
    node.classList.add("failed");
    fill(node, { text: `Not answered: ${turn.error}`, version: "no answer", id: "" });
  } else {
    fill(node, { text: turn.content, version: `answered by ${turn.adapter ?? "the base model"}`, id: turn.id ?? "" });
  }
  if (turn.correction) {
    node.querySelector(".corrected").hidden = false;
    slot(node, "correction").textContent = turn.correction;
  }
  if (turn.memories?.length) {
    node.querySelector(".used").hidden = false;
    slot(node, "memories").replaceChildren(...turn.memories.map((m) => {
      const item = document.createElement("li");
      item.textContent = `#${m.id} · score ${m.score.toFixed(2)} · “${m.question}” → ${m.answer}`;
      return item;
    }));
  }
  const actions = node.querySelector(".actions");
  actions.hidden = Boolean(turn.streaming);
  const button = (act) => actions.querySelector(`[data-act="${act}"]`);
  const question = [...current.turns.slice(0, index)].reverse().find((t) => t.role === "user")?.content;
  button("again").addEventListener("click", () => question && !busy && ask(question));
  if (turn.error || !turn.id) {
    for (const act of ["up", "down", "correct"]) button(act).hidden = true;
    return node;
  }
  button("up").setAttribute("aria-pressed", String(turn.rating === 1));
  button("down").setAttribute("aria-pressed", String(turn.rating === -1));
  const rate = async (rating) => {
    try {
      await api.post("/v1/feedback", { response_id: turn.id, rating });
      turn.rating = rating;
      save();
      button("up").setAttribute("aria-pressed", String(rating === 1));
      button("down").setAttribute("aria-pressed", String(rating === -1));
      note.textContent = rating === 1 ? "Thanks: recorded as a good answer."
        : "Recorded as a bad answer. Correct it to teach the right one.";
      if (rating === -1) openCorrection(node, true);
    } catch (e) {
      note.textContent = `Not recorded: ${e.message}`;
    }
  };
  button("up").addEventListener("click", () => rate(1));
  button("down").addEventListener("click", () => rate(-1));
  button("correct").addEventListener("click", () => openCorrection(node, form.hidden));
  const form = node.querySelector("form.correction");
  form.querySelector('[data-act="cancel"]').addEventListener("click", () => openCorrection(node, false));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const correction = form.elements.answer.value.trim();
    const comment = form.elements.comment.value.trim() || null;
    if (!correction) return;
    try {
      await api.post("/v1/feedback", { response_id: turn.id, rating: -1, correction, comment });
      turn.correction = correction;
      turn.rating = -1;
      save();
      const fresh = answer(turn, index);
      node.replaceWith(fresh);
      slot(fresh, "note").textContent = "Correction saved as a memory: it is used from now on. Ask again to see it.";
      fresh.querySelector('[data-act="again"]').focus();
    } catch (e) {
      note.textContent = `Not saved: ${e.message}`;
    }
  });
  return node;
}

function openCorrection(node, open) {
  const form = node.querySelector("form.correction");
  form.hidden = !open;
  node.querySelector('[data-act="correct"]').setAttribute("aria-expanded", String(open));
  if (open) form.elements.answer.focus();
}
