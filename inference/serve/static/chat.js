// lmlab's chat page: talks to the OpenAI-compatible API of the server that serves it.
//
// The conversation lives in this page (`conversation`) and is sent back whole on every turn.
// Answers stream over `POST /v1/chat/completions` with `stream: true`: the body is read with
// fetch + ReadableStream and parsed as server-sent events (EventSource cannot POST). The stop
// button aborts the fetch, which closes the connection and frees the request's slot on the server.
// Model text only ever reaches the page through `textContent` (never parsed as HTML).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "lmlab-chat-api-key";

  const conversation = []; // [{role: "user" | "assistant", content}], the system prompt is added per request
  let controller = null; // the AbortController of the request in flight

  class ApiError extends Error {}

  // ---- requests -------------------------------------------------------------------------

  function requestHeaders() {
    const headers = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  // The message of an OpenAI-shaped error body ({"error": {"message", "type", "code"}}), with the status.
  async function errorText(response) {
    let message = response.statusText || "request failed";
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) {
      // not JSON: keep the status text
    }
    const retry = response.headers.get("Retry-After");
    const hint = response.status === 401 ? " (enter the server's API key above)"
      : retry ? ` (retry after ${retry} s)` : "";
    return `error ${response.status}: ${message}${hint}`;
  }

  // Yields the `data` of each server-sent event in a fetch body, as text.
  async function* serverSentEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        let text = buffer + decoder.decode(value || new Uint8Array(), { stream: !done });
        let held = ""; // a trailing "\r" may be half of a "\r\n" split across reads
        if (!done && text.endsWith("\r")) {
          held = "\r";
          text = text.slice(0, -1);
        }
        const events = text.replace(/\r\n?/g, "\n").split("\n\n");
        buffer = done ? "" : events.pop() + held;
        for (const event of events) {
          const data = event.split("\n").filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).replace(/^ /, ""));
          if (data.length) yield data.join("\n");
        }
        if (done) return;
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  let modelsRequest = 0; // only the latest model list request shows its answer

  async function loadModels() {
    const select = $("model");
    const ticket = ++modelsRequest;
    try {
      const response = await fetch("/v1/models", { headers: requestHeaders() });
      if (ticket !== modelsRequest) return; // a later request (say, with the key just typed) supersedes this one
      if (!response.ok) {
        showError(`models: ${await errorText(response)}`);
        return;
      }
      const models = (await response.json()).data || [];
      if (ticket !== modelsRequest) return;
      const previous = select.value;
      select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
      if (models.some((m) => m.id === previous)) select.value = previous;
      hideError();
    } catch (error) {
      if (ticket === modelsRequest) showError(`models: ${error.message}`);
    }
  }

  // ---- settings -------------------------------------------------------------------------

  // The sampling fields of the request; a bad field is named instead (returns a string).
  function samplingFields() {
    const fields = {};
    const numbers = [
      ["temperature", "temperature", parseFloat],
      ["top-p", "top_p", parseFloat],
      ["max-tokens", "max_tokens", (v) => parseInt(v, 10)],
      ["seed", "seed", (v) => parseInt(v, 10)],
    ];
    for (const [id, field, parse] of numbers) {
      const input = $(id);
      if (!input.validity.valid) {
        const label = document.querySelector(`label[for="${id}"]`).textContent;
        return `${label}: ${input.validationMessage}`;
      }
      if (input.value.trim() === "") continue;
      fields[field] = parse(input.value);
    }
    // one per line; a typed \n stands for a line break (a line cannot hold one)
    const stop = $("stop").value.split("\n").filter((line) => line !== "").map((line) => line.replace(/\\n/g, "\n"));
    if (stop.length) fields.stop = stop;
    return fields;
  }

  function requestMessages() {
    const system = $("system").value.trim();
    return system ? [{ role: "system", content: system }, ...conversation] : [...conversation];
  }

  // ---- the page -------------------------------------------------------------------------

  function addMessage(role, text) {
    const item = document.createElement("div");
    item.className = `message ${role}`;
    item.dataset.role = role;
    const who = document.createElement("div");
    who.className = "role";
    who.textContent = role === "user" ? "You" : "Assistant";
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = text;
    item.append(who, content);
    $("messages").append(item);
    item.scrollIntoView({ block: "end" });
    return item;
  }

  function showError(text) {
    const box = $("error");
    box.textContent = text;
    box.hidden = false;
  }

  function hideError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop-generation").disabled = !busy;
    $("clear").disabled = busy;
    $("messages").setAttribute("aria-busy", String(busy));
  }

  function statsText(usage, pieces, startedAt, firstAt, endedAt, finish) {
    const parts = [];
    const completion = usage ? usage.completion_tokens : pieces;
    if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
    else parts.push(`${pieces} chunks`);
    if (firstAt !== null) {
      parts.push(`first token after ${Math.round(firstAt - startedAt)} ms`);
      const seconds = (endedAt - firstAt) / 1000;
      if (completion > 1 && seconds > 0) parts.push(`${((completion - 1) / seconds).toFixed(1)} tokens/s`);
    }
    if (finish) parts.push(`finish: ${finish}`);
    return parts.join(" · ");
  }

  // ---- one turn -------------------------------------------------------------------------

  async function send(text) {
    const fields = samplingFields();
    if (typeof fields === "string") {
      showError(fields);
      return;
    }
    hideError();
    $("prompt").value = "";
    conversation.push({ role: "user", content: text });
    const userItem = addMessage("user", text);
    const assistantItem = addMessage("assistant", "");
    const content = assistantItem.querySelector(".content");
    assistantItem.classList.add("streaming");
    setBusy(true);
    controller = new AbortController();

    const body = { messages: requestMessages(), stream: true, stream_options: { include_usage: true }, ...fields };
    if ($("model").value) body.model = $("model").value;
    const startedAt = performance.now();
    let firstAt = null;
    let pieces = 0;
    let usage = null;
    let finish = null;
    let answer = "";
    let failure = null;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: requestHeaders(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) throw new ApiError(await errorText(response));
      for await (const data of serverSentEvents(response.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(`error: ${chunk.error.message}`);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.index) continue; // the page asks for one choice
          const delta = (choice.delta && choice.delta.content) || "";
          if (delta) {
            if (firstAt === null) firstAt = performance.now();
            pieces += 1;
            answer += delta;
            content.textContent = answer;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    } catch (error) {
      if (error.name === "AbortError") finish = "stopped";
      else failure = error instanceof ApiError ? error.message : `error: ${error.message}`;
    } finally {
      controller = null;
    }
    const endedAt = performance.now();

    assistantItem.classList.remove("streaming");
    if (answer === "" && finish !== "length" && finish !== "stop") {
      // nothing came back: the turn is undone and its text returned to the box, to edit or resend
      conversation.pop();
      userItem.remove();
      assistantItem.remove();
      if ($("prompt").value === "") $("prompt").value = text;
    } else {
      conversation.push({ role: "assistant", content: answer });
      assistantItem.dataset.finish = finish || (failure ? "error" : "");
    }
    if (failure) showError(failure);
    $("stats").textContent = assistantItem.isConnected
      ? statsText(usage, pieces, startedAt, firstAt, endedAt, finish) : "";
    setBusy(false);
    $("prompt").focus();
  }

  // ---- wiring ---------------------------------------------------------------------------

  function start() {
    const stored = sessionStorage.getItem(KEY_STORAGE);
    if (stored) $("api-key").value = stored;

    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("prompt").value;
      if (controller || text.trim() === "") return;
      send(text);
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop-generation").addEventListener("click", () => {
      if (controller) controller.abort();
    });
    $("clear").addEventListener("click", () => {
      conversation.length = 0;
      $("messages").replaceChildren();
      $("stats").textContent = "";
      hideError();
    });
    $("api-key").addEventListener("change", () => {
      sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
      loadModels();
    });
    $("connection").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
      loadModels();
    });
    setBusy(false);
    loadModels();
  }

  start();
})();
