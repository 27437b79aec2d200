// lmlab's labeling page: shows the server's current item and posts the annotator's choice.
//
// The server holds the state (annotate/app.py): the current item is the first one not judged,
// so this page only renders what /api/state, /api/label and /api/undo answer. One request at a
// time: keys and clicks made while one is in flight are ignored (no double judgment).
// Task text only ever reaches the page through `textContent` (never parsed as HTML).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // Keys of the preference choices; class labels take 1..9 in the label set's order.
  const PAIR_KEYS = { a: ["1", "a", "ArrowLeft"], b: ["2", "b", "ArrowRight"], tie: ["3", "t"], skip: ["s"] };
  const PAIR_NAMES = { a: "A is better", b: "B is better", tie: "Tie", skip: "Skip" };

  let current = null; // the last state the server sent
  let busy = false;

  // ---- requests -------------------------------------------------------------------------

  async function call(path, body) {
    const options = body === undefined ? {} : {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    };
    const response = await fetch(path, options);
    let payload = null;
    try {
      payload = await response.json();
    } catch (_) {
      // not JSON: the status says enough
    }
    if (!response.ok) {
      const message = payload && payload.error ? payload.error : response.statusText;
      const error = new Error(`error ${response.status}: ${message}`);
      error.status = response.status;
      throw error;
    }
    return payload;
  }

  async function act(path, body) {
    if (busy) return;
    busy = true;
    setDisabled(true);
    try {
      render(await call(path, body));
      hideError();
    } catch (error) {
      showError(error.message);
      if (error.status === 409) {
        // another tab moved on: show what the server holds now, keeping the message
        try {
          render(await call("/api/state"));
        } catch (_) {
          // the error shown is the first one
        }
      }
    } finally {
      busy = false;
      setDisabled(false);
    }
  }

  const choose = (choice) => {
    if (current && current.item) act("/api/label", { id: current.item.id, choice });
  };
  const undo = () => {
    if (current && current.last) act("/api/undo", {});
  };

  // ---- rendering ------------------------------------------------------------------------

  // A string, or a list of {role, content} messages, as text nodes.
  function fill(element, value) {
    if (typeof value === "string") {
      element.textContent = value;
      return;
    }
    element.replaceChildren(...value.map((message) => {
      const box = document.createElement("div");
      box.className = "message";
      const role = document.createElement("span");
      role.className = "role";
      role.textContent = message.role;
      box.append(role, document.createTextNode(message.content || ""));
      return box;
    }));
  }

  function choiceKeys(state) {
    if (state.kind === "preference") return PAIR_KEYS;
    const keys = { skip: ["s"] };
    state.labels.forEach((label, i) => { if (i < 9) keys[label] = [String(i + 1)]; });
    return keys;
  }

  function buildChoices(state) {
    const keys = choiceKeys(state);
    const signature = JSON.stringify(state.choices);
    const box = $("choices");
    if (box.dataset.signature === signature) return;
    box.dataset.signature = signature;
    box.replaceChildren(...state.choices.map((choice) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "choice";
      button.dataset.choice = choice;
      button.append(state.kind === "preference" ? PAIR_NAMES[choice] : choice === "skip" ? "Skip" : choice);
      if (keys[choice]) {
        const kbd = document.createElement("kbd");
        kbd.textContent = keys[choice][0];
        button.append(kbd);
      }
      button.addEventListener("click", () => choose(choice));
      return button;
    }));
    $("help").textContent = state.kind === "preference"
      ? "Keys: 1 / a / ← A is better, 2 / b / → B is better, 3 / t tie, s skip, u / Backspace undo."
      : "Keys: 1-9 the labels in order, s skip, u / Backspace undo.";
  }

  function render(state) {
    current = state;
    $("annotator").textContent = state.annotator;
    $("progress").max = Math.max(state.total, 1);
    $("progress").value = state.done;
    $("progress-text").textContent = `${state.done} / ${state.total} judged`;
    buildChoices(state);
    const item = state.item;
    $("item").hidden = item === null;
    $("finished").hidden = item !== null;
    if (item !== null) {
      $("item").dataset.id = item.id;
      $("item-id").textContent = item.id;
      const pair = state.kind === "preference";
      $("pair").hidden = !pair;
      $("single").hidden = pair;
      if (pair) {
        fill($("prompt"), item.prompt);
        fill($("response-a"), item.a);
        fill($("response-b"), item.b);
      } else {
        fill($("text"), item.text);
        $("text-pair-block").hidden = item.text_pair === undefined;
        fill($("text-pair"), item.text_pair === undefined ? "" : item.text_pair);
      }
    }
    $("last").textContent = state.last ? `last: item ${state.last.id} → ${state.last.choice}` : "";
    setDisabled(false);
  }

  function setDisabled(disabled) {
    const done = !current || current.item === null;
    for (const button of $("choices").querySelectorAll("button")) button.disabled = disabled || done;
    $("undo").disabled = disabled || !current || !current.last;
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
  }

  function hideError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  // ---- wiring ---------------------------------------------------------------------------

  function onKey(event) {
    if (!current || event.altKey || event.metaKey || event.isComposing) return;
    if ((event.ctrlKey && event.key === "z") || (!event.ctrlKey && (event.key === "u" || event.key === "Backspace"))) {
      event.preventDefault();
      undo();
      return;
    }
    if (event.ctrlKey) return;
    const keys = choiceKeys(current);
    const choice = Object.keys(keys).find((c) => keys[c].includes(event.key));
    if (choice !== undefined && current.choices.includes(choice)) {
      event.preventDefault();
      choose(choice);
    }
  }

  async function start() {
    document.addEventListener("keydown", onKey);
    $("undo").addEventListener("click", undo);
    try {
      render(await call("/api/state"));
    } catch (error) {
      showError(error.message);
    }
  }

  start();
})();
