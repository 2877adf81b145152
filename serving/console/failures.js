// Failures (admins): answers that went wrong without feedback, by kind, each with its whole
// question and answer, and turned into a lesson (a correction of that question) in one step.

import { api } from "./api.js";
import { $, clone, fill, say, slot, when } from "./ui.js";

const KINDS = ["abstention", "contradiction", "repeat", "engine_error", "timeout"]; // as GET /v1/failures names them
let kind = ""; // the kind shown; "" for all

export function init() {
  $("#failures-open").addEventListener("change", show);
}

export async function show() {
  let rows;
  try {
    rows = (await api.get("/v1/failures", { open: $("#failures-open").checked, limit: 200 })).data;
  } catch (e) {
    say($("#failures-status"), `Failures could not be loaded: ${e.message}`, "error");
    return;
  }
  chips(rows);
  const shown = rows.filter((f) => !kind || f.kind === kind);
  $("#failure-list").replaceChildren(...shown.map(card));
  $("#failures-empty").hidden = shown.length > 0;
  say($("#failures-status"), shown.length ? `${shown.length} failure${shown.length === 1 ? "" : "s"}` : "");
}

/** One button per kind with its count; the pressed one filters the list. */
function chips(rows) {
  const count = (k) => rows.filter((f) => !k || f.kind === k).length;
  $("#failure-kinds").replaceChildren(...["", ...KINDS].map((k) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "chip";
    button.textContent = `${k ? k.replace("_", " ") : "all"} ${count(k)}`;
    button.setAttribute("aria-pressed", String(k === kind));
    button.addEventListener("click", () => {
      kind = k;
      show();
    });
    return button;
  }));
}

function card(f) {
  const node = clone("t-failure");
  fill(node, {
    kind: f.kind.replace("_", " "),
    id: `#${f.id}`,
    who: f.user ? `asked by ${f.user}` : "",
    when: when(f.created_at),
    question: f.prompt ?? "(no question recorded)",
    answer: f.response ?? "(no answer)",
    detail: f.detail ?? "",
  });
  const form = node.querySelector("form.lesson");
  const note = slot(node, "note");
  if (f.lesson_id != null) {
    form.hidden = true;
    note.textContent = `Lesson given: memory #${f.lesson_id}.`;
    return node;
  }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const answer = form.elements.answer.value.trim();
    if (!answer) return;
    try {
      const lesson = await api.post(`/v1/failures/${f.id}/lesson`, { answer, shared: form.elements.shared.checked });
      form.hidden = true;
      note.textContent = `Lesson learnt: memory #${lesson.memory.id} (${lesson.memory.shared ? "for every user" : `for ${lesson.memory.user}`}), used from now on.`;
    } catch (e) {
      note.textContent = `Not taught: ${e.message}`;
    }
  });
  return node;
}
