// The console's shell: who is calling (a key or keyless loopback), which view shows (the
// location's #hash), and the states every view shares: the key prompt, the engine restarting,
// the server unreachable.

import { api, health, key, onError } from "./api.js";
import { $ } from "./ui.js";
import * as chat from "./chat.js";
import * as memory from "./memory.js";
import * as failures from "./failures.js";
import * as learning from "./learning.js";

const VIEWS = { chat, memory, failures, learning };
const ADMIN_VIEWS = new Set(["failures", "learning"]); // routes a user key gets 403 on
export const session = { admin: false, keyed: false, ready: false, user: "" };

let watchingHealth = null; // the timer that polls /health while the engine restarts

async function start() {
  onError(noticed);
  $("#key-form").addEventListener("submit", useKey);
  $("#forget-key").addEventListener("click", () => {
    key.forget();
    askForKey("");
  });
  window.addEventListener("hashchange", route);
  for (const view of Object.values(VIEWS)) view.init(session);
  const status = await health();
  showEngine(status);
  if (status.status === "restarting") restarting();
  session.keyed = Boolean(status.auth);
  if (session.keyed && !key.get()) return askForKey("");
  await enter();
}

/** Find out what the caller may do, then show the view the location asks for. */
async function enter() {
  let caller;
  try {
    caller = await api.get("/v1/caller"); // any key may: a 401 here means the key is wrong
  } catch (e) {
    if (e.status === 401) return askForKey(e.message);
    caller = { user: "", admin: false }; // the server is unreachable or restarting: the shell says so
  }
  session.admin = caller.admin;
  session.user = caller.user;
  $("#who").textContent = caller.user ? `${caller.user}${caller.admin ? " · admin" : ""}` : "";
  document.body.dataset.role = session.admin ? "admin" : "user";
  document.querySelector("nav").hidden = false;
  for (const link of document.querySelectorAll("nav [data-admin]")) link.hidden = !session.admin;
  $("#forget-key").hidden = !key.get();
  session.ready = true;
  route();
}

function askForKey(message) {
  session.ready = false;
  show("key");
  document.querySelector("nav").hidden = true;
  $("#key-error").textContent = message;
  $("#forget-key").hidden = true;
  $("#key-input").focus();
}

async function useKey(event) {
  event.preventDefault();
  const token = $("#key-input").value.trim();
  if (!token) return;
  key.set(token);
  $("#key-input").value = "";
  await enter();
}

function route() {
  if (!session.ready) return;
  const name = location.hash.slice(1) || "chat";
  if (!(name in VIEWS)) return show("chat");
  if (ADMIN_VIEWS.has(name) && !session.admin) return show("locked");
  show(name);
  VIEWS[name].show();
}

function show(name) {
  for (const section of document.querySelectorAll("main > .view")) section.hidden = section.id !== `view-${name}`;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

/** Every failed call comes through here: a 401 asks for a key, a 503 may be a restart. */
function noticed(error) {
  if (error.status === 401 && session.ready) askForKey(error.message);
  else if (error.status === 503) checkEngine();
  else if (error.status === 0) banner("The server cannot be reached. Is `ratchet serve` running?", "error");
}

async function checkEngine() {
  const status = await health();
  showEngine(status);
  if (status.status === "restarting") restarting();
}

/** The engine restarts: say so, and check /health every second until it answers again. */
function restarting() {
  banner("The engine is restarting. Answers resume in a few seconds; this page checks every second.", "warn");
  if (watchingHealth) return;
  watchingHealth = setInterval(async () => {
    const status = await health();
    if (status.status !== "ok") return;
    clearInterval(watchingHealth);
    watchingHealth = null;
    showEngine(status);
    banner("The engine is back.", "ok");
    setTimeout(() => banner(""), 3000);
  }, 1000);
}

function banner(text, kind = "") {
  const node = $("#banner");
  node.textContent = text;
  node.className = `banner ${kind}`;
  node.hidden = !text;
}

/** The pill in the header: engine, the version served as `ratchet`, or the restart. */
export function showEngine(status) {
  const pill = $("#engine");
  if (status.status === "unreachable") {
    pill.textContent = "server unreachable";
  } else if (status.status === "restarting") {
    pill.textContent = `${status.engine}: restarting`;
  } else {
    pill.textContent = `${status.engine} · serving ${status.active ?? "the base model"}`;
  }
  pill.dataset.state = status.status;
}

export async function refreshEngine() {
  showEngine(await health());
}

start();
