// Small helpers shared by the views: templates filled with text (never parsed as HTML), the
// confirmation dialog, and how times and figures are written.

export const $ = (selector, root = document) => root.querySelector(selector);

/** A fresh copy of the first element of <template id=...>. */
export function clone(id) {
  return document.getElementById(id).content.firstElementChild.cloneNode(true);
}

/** The element of `node` marked data-slot=name. */
export function slot(node, name) {
  return node.querySelector(`[data-slot="${name}"]`);
}

/** Set the text of `node`'s slots: {name: text}. */
export function fill(node, values) {
  for (const [name, value] of Object.entries(values)) slot(node, name).textContent = value ?? "";
  return node;
}

/** Ask before doing something that cannot be undone lightly; resolves true when confirmed. */
export function confirmAction(text, action) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = action;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

/** An ISO time as this browser's short local date and time. */
export function when(iso) {
  if (!iso) return "";
  const date = new Date(/[zZ]|[+-]\d\d:\d\d$/.test(iso) ? iso : `${iso}Z`);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

/** A share between 0 and 1 with two decimals, or a dash when unknown. */
export function figure(value) {
  return typeof value === "number" ? value.toFixed(2) : "–";
}

/** Show `message` in a status line, and say it to screen readers. */
export function say(node, message, kind = "") {
  node.textContent = message;
  node.className = `${node.className.replace(/\b(error|ok)\b/g, "").trim()} ${kind}`.trim();
}
