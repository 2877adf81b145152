// Ratchet's public HTTP API as the console calls it: the key kept in this tab, errors in
// OpenAI's shape raised as ApiError, and the server-sent chunks of a streamed answer.

const KEY = "ratchet.key"; // sessionStorage entry: the API key entered once in this tab

export class ApiError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status; // the HTTP status; 0 when the server could not be reached
    this.code = code; // the error's `code`, e.g. engine_restarting, admin_required
  }
}

export const key = {
  get: () => sessionStorage.getItem(KEY),
  set: (token) => sessionStorage.setItem(KEY, token),
  forget: () => sessionStorage.removeItem(KEY),
};

const watchers = new Set(); // told of every ApiError, so the shell can show 401s and 503s once
export function onError(fn) {
  watchers.add(fn);
}

function told(error) {
  for (const fn of watchers) fn(error);
  return error;
}

async function send(method, path, body) {
  const headers = {};
  const token = key.get();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw told(new ApiError(0, "cannot reach the server"));
  }
  if (!response.ok) throw told(await errorOf(response));
  return response;
}

async function errorOf(response) {
  let message = response.statusText;
  let code = null;
  try {
    const body = await response.json();
    message = body.error?.message ?? message;
    code = body.error?.code ?? null;
  } catch {
    // not JSON: the status line says enough
  }
  return new ApiError(response.status, message, code);
}

function withQuery(path, params) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== ""));
  return query.size ? `${path}?${query}` : path;
}

export const api = {
  get: async (path, params = {}) => (await send("GET", withQuery(path, params))).json(),
  post: async (path, body = {}) => (await send("POST", path, body)).json(),
  delete: async (path) => (await send("DELETE", path)).json(),
  blob: async (path) => (await send("GET", path)).blob(), // an image the key may see, for an object URL
};

/** GET /health, which answers 503 with the same body while the engine restarts. */
export async function health() {
  try {
    return await (await fetch("/health")).json();
  } catch {
    return { status: "unreachable" };
  }
}

/** A streamed chat completion: yields each `chat.completion.chunk`; an error event is thrown. */
export async function* streamChat(body) {
  const response = await send("POST", "/v1/chat/completions", { ...body, stream: true });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice("data: ".length);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          const status = chunk.error.type === "server_error" ? 503 : 400;
          throw told(new ApiError(status, chunk.error.message, chunk.error.code));
        }
        yield chunk;
      }
    }
  }
}
