"""The page `phi3v-ort serve` answers at `/`: try the model in a browser.

One self-contained HTML document (inline CSS and JavaScript, no build step, nothing fetched from anywhere but this
server, which the Content-Security-Policy header enforces). It talks to the server's own
`/v1/chat/completions` with `stream: true` and reads the SSE stream with fetch (EventSource cannot POST).

- Images: pick them (the file field), drop them anywhere on the page, or paste them; each is sent as a data: URI
  with its question, and every later turn resends the conversation (the server continues the kept KV cache).
- Stats under each answer: prompt tokens and image tokens (the `X-Phi3v-Image-Tokens` header), time to first
  token as this browser saw it, decode tokens/s, tokens generated and the finish reason (from `usage`).
- "New conversation" forgets the turns; the API key field (kept for this tab only) becomes `Authorization`.
- Keyboard alone: every control is a native input or button in a sensible tab order; Enter sends (Shift+Enter is a
  new line), Escape stops an answer, focus is always visible.
"""

from __future__ import annotations

import html

# everything inline or from this server; images are data: or blob: URLs made in the page
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'")


def page(model_name: str) -> str:
    return PAGE.replace("{{MODEL}}", html.escape(model_name, quote=True))


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>phi3v-ort · {{MODEL}}</title>
<style>
  :root { --fg: #1d2430; --muted: #5b6677; --line: #d5dbe3; --bg: #f6f8fa; --accent: #1f5fbf; --err: #a3261f; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
         background: var(--bg); }
  header { display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; align-items: center; padding: .75rem 1.25rem;
           background: #fff; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 1.1rem; margin: 0; }
  header .model { color: var(--muted); }
  header label { margin-left: auto; color: var(--muted); font-size: .9rem; }
  main { max-width: 860px; margin: 0 auto; padding: 1rem 1.25rem 2rem; }
  #log { display: flex; flex-direction: column; gap: .9rem; margin-bottom: 1rem; }
  .turn { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: .75rem 1rem; }
  .question { font-weight: 600; white-space: pre-wrap; }
  .thumbs { display: flex; flex-wrap: wrap; gap: .5rem; margin: .4rem 0; }
  .thumbs img { max-height: 120px; max-width: 200px; border: 1px solid var(--line); border-radius: 4px; }
  .answer { white-space: pre-wrap; margin-top: .5rem; min-height: 1.5em; }
  .answer.pending::after { content: "▍"; color: var(--muted); }
  .stats { color: var(--muted); font-size: .85rem; margin-top: .5rem; font-variant-numeric: tabular-nums; }
  .error { color: var(--err); margin-top: .5rem; }
  form { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: .75rem 1rem; }
  #drop { border: 2px dashed var(--line); border-radius: 6px; padding: .6rem .8rem; margin-bottom: .6rem;
          color: var(--muted); }
  body.dragging #drop { border-color: var(--accent); background: #eef4fd; }
  #attached:empty { display: none; }
  #attached .thumb { position: relative; }
  #attached button { position: absolute; top: 2px; right: 2px; padding: 0 .4rem; }
  textarea { width: 100%; min-height: 4.5em; font: inherit; padding: .5rem; border: 1px solid var(--line);
             border-radius: 6px; resize: vertical; }
  .row { display: flex; flex-wrap: wrap; gap: .6rem; align-items: center; margin-top: .6rem; }
  .row .spacer { flex: 1; }
  button { font: inherit; padding: .35rem .9rem; border-radius: 6px; border: 1px solid var(--line);
           background: #fff; color: var(--fg); cursor: pointer; }
  button.primary { background: var(--accent); border-color: var(--accent); color: #fff; }
  button:disabled { opacity: .5; cursor: default; }
  input[type=password], input[type=number] { font: inherit; padding: .2rem .4rem; border: 1px solid var(--line);
                                             border-radius: 4px; }
  input[type=number] { width: 5.5em; }
  :focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
  .hint { color: var(--muted); font-size: .85rem; }
  .sr-only { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
</style>
</head>
<body>
<header>
  <h1>phi3v-ort</h1><span class="model" id="model">{{MODEL}}</span>
  <label>API key <input type="password" id="apikey" autocomplete="off" placeholder="if the server needs one"></label>
</header>
<main>
  <section id="log" aria-live="polite" aria-label="Conversation"></section>
  <form id="ask" autocomplete="off">
    <div id="drop">
      <label for="file">Images</label>
      <input type="file" id="file" accept="image/*" multiple>
      <span class="hint">or drop / paste them here</span>
      <div id="attached" class="thumbs" aria-label="Images for the next question"></div>
    </div>
    <label for="question" class="sr-only">Question</label>
    <textarea id="question" placeholder="Ask about the images (Enter sends, Shift+Enter: new line)"></textarea>
    <div class="row">
      <button type="submit" class="primary" id="send">Ask</button>
      <button type="button" id="stop" disabled>Stop</button>
      <span class="spacer"></span>
      <label>Max tokens <input type="number" id="maxtokens" min="1" value="256"></label>
      <button type="button" id="new">New conversation</button>
    </div>
    <div id="status" class="error" role="alert"></div>
  </form>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const messages = [];          // the conversation as OpenAI messages (images as data: URIs)
let attached = [];            // [{name, url}] for the next question
let controller = null;        // the running request's AbortController

const apikey = $("apikey");
apikey.value = sessionStorage.getItem("phi3v-ort-api-key") || "";
apikey.addEventListener("change", () => sessionStorage.setItem("phi3v-ort-api-key", apikey.value));

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({name: file.name || "pasted image", url: reader.result});
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/"));
  if (!images.length) { $("status").textContent = "Only image files can be attached."; return; }
  $("status").textContent = "";
  attached = attached.concat(await Promise.all(images.map(readFile)));
  showAttached();
}

function showAttached() {
  const box = $("attached");
  box.replaceChildren();
  attached.forEach((img, i) => {
    const wrap = document.createElement("span");
    wrap.className = "thumb";
    const el = document.createElement("img");
    el.src = img.url; el.alt = img.name;
    const remove = document.createElement("button");
    remove.type = "button"; remove.textContent = "×";
    remove.setAttribute("aria-label", "Remove " + img.name);
    remove.addEventListener("click", () => { attached.splice(i, 1); showAttached(); $("file").focus(); });
    wrap.append(el, remove);
    box.append(wrap);
  });
}

$("file").addEventListener("change", (e) => { attach(e.target.files); e.target.value = ""; });
document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) document.body.classList.remove("dragging"); });
document.addEventListener("drop", (e) => {
  e.preventDefault(); document.body.classList.remove("dragging");
  if (e.dataTransfer && e.dataTransfer.files.length) attach(e.dataTransfer.files);
});
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData ? e.clipboardData.files : [])];
  if (files.length) { e.preventDefault(); attach(files); }
});

$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("ask").requestSubmit(); }
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && controller) controller.abort(); });
$("stop").addEventListener("click", () => controller && controller.abort());
$("new").addEventListener("click", () => {
  if (controller) controller.abort();
  messages.length = 0; attached = []; showAttached();
  $("log").replaceChildren(); $("status").textContent = ""; $("question").value = "";
  $("question").focus();
});

function fmt(n) { return n.toLocaleString("en-US"); }

function addTurn(question, images) {
  const turn = document.createElement("article");
  turn.className = "turn";
  const q = document.createElement("div");
  q.className = "question"; q.textContent = question;
  turn.append(q);
  if (images.length) {
    const thumbs = document.createElement("div");
    thumbs.className = "thumbs";
    for (const img of images) {
      const el = document.createElement("img");
      el.src = img.url; el.alt = img.name;
      thumbs.append(el);
    }
    turn.append(thumbs);
  }
  const answer = document.createElement("div");
  answer.className = "answer pending";
  const stats = document.createElement("div");
  stats.className = "stats";
  turn.append(answer, stats);
  $("log").append(turn);
  return {turn, answer, stats};
}

function busy(on) {
  $("send").disabled = on; $("stop").disabled = !on;
}

$("ask").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (controller) return;
  const question = $("question").value.trim();
  if (!question) { $("status").textContent = "Type a question first."; $("question").focus(); return; }
  $("status").textContent = "";
  const images = attached;
  const content = [{type: "text", text: question}]
    .concat(images.map((img) => ({type: "image_url", image_url: {url: img.url}})));
  const pending = messages.concat([{role: "user", content}]);
  const view = addTurn(question, images);
  attached = []; showAttached(); $("question").value = "";
  const headers = {"Content-Type": "application/json"};
  if (apikey.value) headers["Authorization"] = "Bearer " + apikey.value;
  const maxTokens = parseInt($("maxtokens").value, 10);
  const body = {messages: pending, stream: true, stream_options: {include_usage: true}};
  if (maxTokens > 0) body.max_tokens = maxTokens;
  controller = new AbortController();
  busy(true);
  const started = performance.now();
  let first = null, last = null, text = "", usage = null, finish = null, failed = null, imageTokens = [];
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers, body: JSON.stringify(body),
                                                          signal: controller.signal});
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try { message = (await response.json()).error.message + " (HTTP " + response.status + ")"; } catch (_) {}
      throw new Error(message);
    }
    imageTokens = (response.headers.get("X-Phi3v-Image-Tokens") || "").split(",").filter(Boolean).map(Number);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) { failed = chunk.error.message; continue; }
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            if (first === null) first = performance.now();
            last = performance.now();
            text += choice.delta.content;
            view.answer.textContent = text;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  } catch (err) {
    failed = err.name === "AbortError" ? "stopped" : err.message;
  } finally {
    controller = null;
    busy(false);
    view.answer.classList.remove("pending");
  }
  if (failed) {
    const problem = document.createElement("div");
    problem.className = "error"; problem.textContent = failed === "stopped" ? "[answer stopped]" : "Error: " + failed;
    view.turn.append(problem);
    if (!text) {  // nothing came: the question and its images go back to the form
      view.turn.remove();
      $("question").value = question; attached = images.concat(attached); showAttached();
      $("status").textContent = problem.textContent;
      $("question").focus();
      return;
    }
  }
  messages.push({role: "user", content}, {role: "assistant", content: text});
  const parts = [];
  if (usage) {
    const img = imageTokens.length ? " (image tokens: " + imageTokens.map(fmt).join(", ") + ")" : "";
    parts.push("prompt tokens " + fmt(usage.prompt_tokens) + img);
  }
  if (first !== null) parts.push("first token " + ((first - started) / 1000).toFixed(2) + " s");
  if (usage && usage.completion_tokens > 1 && last > first) {
    parts.push(((usage.completion_tokens - 1) / ((last - first) / 1000)).toFixed(1) + " tokens/s");
  }
  if (usage) parts.push(fmt(usage.completion_tokens) + " tokens generated" + (finish ? ", finish: " + finish : ""));
  view.stats.textContent = parts.join(" · ");
  $("question").focus();
});
$("question").focus();
</script>
</body>
</html>
"""
