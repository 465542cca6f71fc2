// llama-jax web chat: keeps the conversation in the page and sends all of it (system prompt first when set) to
// POST /v1/chat/completions with stream: true on every turn, as the OpenAI API expects; the server keeps no state.
//
// The answer is streamed with fetch and a ReadableStream reader, not EventSource, because EventSource can only GET.
// Each server-sent event is `data: <chat.completion.chunk JSON>` and the stream ends with `data: [DONE]`; an error
// is a JSON body `{"error": {"message": ...}}` (or, mid-stream, an event holding one).
//
// For tests and tools the page exposes its state as data attributes: the conversation's data-state is "idle" or
// "streaming" and its data-turns counts the messages sent (answered or not); every assistant message has
// data-chunks (content pieces received so far), data-tokens (the server's count of generated tokens, from the
// usage chunk that ends the stream) and, once done, data-finish ("stop", "length", "aborted", or "error"
// when the stream broke after some text).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    conversation: $("conversation"), emptyHint: $("empty-hint"), error: $("error"), status: $("status"),
    form: $("composer"), message: $("message"), send: $("send"), stop: $("stop"), newChat: $("new-chat"),
    system: $("system-prompt"), temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
    modelName: $("model-name"),
  };
  // Only user and assistant turns; the system prompt is read from its field at every send, so edits apply at once.
  let messages = [];
  let current = null; // the AbortController of the answer being streamed, null when idle
  let modelId = null;

  function headers() {
    const result = { "Content-Type": "application/json" };
    const key = ui.apiKey.value.trim();
    if (key) result.Authorization = `Bearer ${key}`;
    return result;
  }

  // The server's own words when it sent an OpenAI-style error body, otherwise the HTTP status line.
  async function errorText(response) {
    let detail = response.statusText;
    try {
      const body = await response.text();
      detail = body;
      const parsed = JSON.parse(body);
      if (parsed && parsed.error && parsed.error.message) detail = parsed.error.message;
    } catch (_) { /* not JSON: keep the text */ }
    return `Server error ${response.status}: ${detail}`;
  }

  async function loadModel(signal) {
    const response = await fetch("v1/models", { headers: headers(), signal });
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    if (!body.data || !body.data.length) throw new Error("The server lists no model at /v1/models.");
    modelId = body.data[0].id;
    ui.modelName.textContent = modelId;
    return modelId;
  }

  // At start-up and after the key changes. A failure here is not shown (the key may still be being typed) and keeps
  // the model last listed: a wrong key is then reported by the chat request itself when the message is sent.
  function refreshModel() {
    loadModel().catch(() => {});
  }

  function showError(text) {
    ui.error.textContent = text;
    ui.error.hidden = false;
  }

  function clearError() {
    ui.error.textContent = "";
    ui.error.hidden = true;
  }

  function announce(text) {
    ui.status.textContent = text;
  }

  // One <li> per message; the text lives in a single Text node so that streamed pieces are appended, not re-rendered
  // (textContent, never innerHTML: the model's output is shown as text).
  function addMessage(role, text) {
    const item = document.createElement("li");
    item.className = `message ${role}`;
    item.dataset.role = role;
    const label = document.createElement("span");
    label.className = "role";
    label.textContent = role === "user" ? "You" : "Assistant";
    const content = document.createElement("div");
    content.className = "content";
    content.appendChild(document.createTextNode(text));
    item.append(label, content);
    ui.conversation.appendChild(item);
    ui.emptyHint.hidden = true;
    scrollToEnd(true);
    return item;
  }

  function scrollToEnd(force) {
    const box = ui.conversation;
    // Follow the answer only when the reader is already at the bottom, so scrolling up to read is not undone.
    if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 80) box.scrollTop = box.scrollHeight;
  }

  function setBusy(busy) {
    ui.conversation.dataset.state = busy ? "streaming" : "idle";
    ui.conversation.setAttribute("aria-busy", String(busy));
    ui.message.disabled = busy;
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
    if (busy) ui.stop.focus();
    else ui.message.focus();
  }

  // Number fields are checked by the browser's own constraints (min, max, step); null when one is invalid.
  function readSettings() {
    for (const field of [ui.temperature, ui.maxTokens]) {
      if (!field.checkValidity() || field.value === "") {
        field.reportValidity();
        showError(`${field.labels[0].textContent}: ${field.validationMessage || "a number is required"}`);
        return null;
      }
    }
    return { temperature: Number(ui.temperature.value), max_tokens: Number(ui.maxTokens.value) };
  }

  // The data payloads of server-sent events, one per event (multi-line data joined by newlines, per the SSE spec).
  async function* eventData(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
        const events = buffer.split(/\r\n\r\n|\n\n|\r\r/);
        buffer = done ? "" : events.pop();
        for (const event of events) {
          const data = event.split(/\r\n|\n|\r/).filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5));
          if (data.length) yield data.join("\n");
        }
        if (done) return;
      }
    } finally {
      reader.releaseLock();
    }
  }

  function showUsage(item, usage) {
    item.dataset.tokens = String(usage.completion_tokens);
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = ` · ${usage.completion_tokens} tokens`;
    item.querySelector(".role").appendChild(meta);
  }

  // Streams one answer into `item`; returns {text, finish}, throws on an HTTP or stream error.
  async function streamAnswer(item, request, signal) {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const node = item.querySelector(".content").firstChild;
    let text = "";
    let chunks = 0;
    let finish = null;
    for await (const data of eventData(response.body)) {
      // Events already read from the network are not shown after Stop: the answer ends where Stop found it.
      signal.throwIfAborted();
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(`Server error: ${chunk.error.message}`);
      const choice = chunk.choices && chunk.choices[0];
      if (chunk.usage) showUsage(item, chunk.usage);
      if (!choice) continue; // the usage-only chunk
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        node.appendData(piece);
        text += piece;
        item.dataset.chunks = String(++chunks);
        scrollToEnd(false);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    return { text, finish: finish || "stop" };
  }

  async function send() {
    const userText = ui.message.value;
    if (!userText.trim() || current) return;
    clearError();
    const settings = readSettings();
    if (!settings) return;

    const controller = new AbortController();
    current = controller;
    ui.conversation.dataset.turns = String(Number(ui.conversation.dataset.turns || 0) + 1);
    messages.push({ role: "user", content: userText });
    const userItem = addMessage("user", userText);
    const answerItem = addMessage("assistant", "");
    answerItem.dataset.chunks = "0";
    ui.message.value = "";
    setBusy(true);
    announce("The assistant is answering.");

    const system = ui.system.value.trim();
    let text = "";
    let finish = "error";
    let failure = null;
    try {
      const model = modelId || await loadModel(controller.signal);
      const request = {
        model,
        messages: system ? [{ role: "system", content: system }, ...messages] : [...messages],
        stream: true,
        stream_options: { include_usage: true },
        ...settings,
      };
      ({ text, finish } = await streamAnswer(answerItem, request, controller.signal));
    } catch (err) {
      text = answerItem.querySelector(".content").textContent;
      if (controller.signal.aborted) finish = "aborted";
      else failure = err instanceof TypeError ? `Could not reach the server: ${err.message}` : err.message;
    }
    if (current !== controller) return; // "New chat" was pressed meanwhile and has already cleared this turn
    current = null;

    if (!text && (failure || finish === "aborted")) {
      // Nothing came back: take the turn back and return the text to the input, so it can be sent again. (An answer
      // that is empty by the model's choice, an immediate end of sequence, stays: it is part of the conversation.)
      messages.pop();
      userItem.remove();
      answerItem.remove();
      ui.message.value = userText;
      ui.emptyHint.hidden = messages.length > 0;
    } else {
      messages.push({ role: "assistant", content: text });
      answerItem.dataset.finish = finish;
      if (finish === "aborted") answerItem.classList.add("stopped");
      if (finish === "length") answerItem.classList.add("truncated");
    }
    setBusy(false);
    if (failure) {
      showError(failure);
      announce("The answer failed.");
    } else {
      announce(finish === "aborted" ? "Stopped." : "The answer is complete.");
    }
  }

  function stop() {
    if (current) current.abort();
  }

  function newChat() {
    if (current) {
      const running = current;
      current = null; // the running send() sees this and leaves the cleared page alone
      running.abort();
    }
    messages = [];
    ui.conversation.replaceChildren();
    ui.emptyHint.hidden = false;
    clearError();
    setBusy(false);
    announce("New chat started.");
  }

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.message.addEventListener("keydown", (event) => {
    // Enter sends, Shift+Enter is a newline; a key that ends an input-method composition is not a send.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.form.requestSubmit();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && current) {
      event.preventDefault();
      stop();
    }
  });
  // Enter in a settings field must not submit (and reload) the page.
  $("settings").addEventListener("submit", (event) => event.preventDefault());
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newChat);
  ui.apiKey.addEventListener("change", refreshModel);

  refreshModel();
  ui.message.focus();
})();
