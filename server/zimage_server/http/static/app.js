// The playground: one streamed request to /v1/images/generations per click, progress from
// its events, results and a short history kept in this browser. No external resources.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "zimage.apiKey";
const HISTORY = "zimage.history";
const HISTORY_LIMIT = 12;
const MAX_SEED = 2 ** 53 - 1; // what a JavaScript number holds exactly
let config = null;

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function loadConfig() {
  const response = await fetch("playground/config");
  config = await response.json();
  $("model").textContent = config.model;
  const select = $("size");
  for (const size of config.sizes) select.add(new Option(size, size));
  select.add(new Option("custom…", "custom"));
  select.value = config.default_size;
  $("steps").value = config.default_steps;
  $("steps").max = config.max_steps;
  $("n").max = config.max_n;
  $("key-row").hidden = !config.auth;
  for (const adapter of config.adapters) $("adapter").add(new Option(adapter.name, adapter.name));
  $("adapter-row").hidden = config.adapters.length === 0;
  showScale();
  $("api-key").value = localStorage.getItem(KEY) || "";
}

async function pollHealth() {
  try {
    const response = await fetch("healthz/ready");
    const badge = $("health");
    badge.textContent = response.ok ? "ready" : "starting";
    badge.className = response.ok ? "badge ok" : "badge";
  } catch {
    $("health").textContent = "unreachable";
  }
}

function showScale() {
  $("adapter-scale-value").textContent = Number($("adapter-scale").value).toFixed(2);
}

function adapterDefault(name) {
  const adapter = config.adapters.find((a) => a.name === name);
  return adapter ? adapter.scale : 1;
}

function chosenSize() {
  return $("size").value === "custom" ? $("custom-size").value.trim() : $("size").value;
}

function randomSeed() {
  const words = crypto.getRandomValues(new Uint32Array(2));
  return ((words[0] & 0x1fffff) * 2 ** 32 + words[1]) % MAX_SEED;
}

function blobUrl(b64, format) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return URL.createObjectURL(new Blob([bytes], { type: "image/" + format }));
}

function card(index, seed) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.alt = "image " + (index + 1);
  const caption = document.createElement("figcaption");
  const label = document.createElement("span");
  label.textContent = "seed " + seed;
  const link = document.createElement("a");
  link.textContent = "download";
  link.hidden = true;
  caption.append(label, link);
  figure.append(img, caption);
  return { figure, img, link };
}

// Server-sent events from a fetch body: yields {event, data} as they arrive.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

async function thumbnail(url) {
  const img = new Image();
  img.src = url;
  await img.decode();
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 96;
  const scale = Math.max(96 / img.width, 96 / img.height);
  const w = img.width * scale, h = img.height * scale;
  canvas.getContext("2d").drawImage(img, (96 - w) / 2, (96 - h) / 2, w, h);
  return canvas.toDataURL("image/jpeg", 0.7);
}

function readHistory() {
  try {
    return JSON.parse(localStorage.getItem(HISTORY) || "[]");
  } catch {
    return [];
  }
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  for (const entry of readHistory()) {
    const item = document.createElement("li");
    const img = document.createElement("img");
    img.src = entry.thumb; // a data: URL made here
    img.alt = "";
    const text = document.createElement("span");
    const adapter = entry.lora ? ` · ${entry.lora[0].name} ${entry.lora[0].scale}` : "";
    text.textContent = `${entry.prompt} · ${entry.size} · ${entry.steps} steps · seed ${entry.seed}${adapter}`;
    item.append(img, text);
    item.title = "Use these settings again";
    item.addEventListener("click", () => restore(entry));
    list.append(item);
  }
}

function restore(entry) {
  $("prompt").value = entry.prompt;
  const known = [...$("size").options].some((o) => o.value === entry.size);
  $("size").value = known ? entry.size : "custom";
  $("custom-size").hidden = known;
  if (!known) $("custom-size").value = entry.size;
  $("steps").value = entry.steps;
  $("seed").value = entry.seed;
  $("n").value = entry.n;
  const adapter = entry.lora ? entry.lora[0] : null;
  const offered = adapter && [...$("adapter").options].some((o) => o.value === adapter.name);
  $("adapter").value = offered ? adapter.name : "";
  if (offered) $("adapter-scale").value = adapter.scale;
  showScale();
}

async function remember(entry, url) {
  try {
    entry.thumb = await thumbnail(url);
  } catch {
    return;
  }
  const history = [entry, ...readHistory()].slice(0, HISTORY_LIMIT);
  try {
    localStorage.setItem(HISTORY, JSON.stringify(history));
  } catch {
    localStorage.setItem(HISTORY, JSON.stringify(history.slice(0, 3)));
  }
  renderHistory();
}

// Edit mode: the image to edit, shown on a canvas, and the mask painted over it (kept on a
// canvas of the image's size: opaque, transparent where painted, as OpenAI's masks are).
const edit = { file: null, image: null, mask: null, painted: false };

function showStrength() {
  $("strength-value").textContent = Number($("strength").value).toFixed(2);
}

function drawEdit() {
  const canvas = $("edit-canvas");
  const context = canvas.getContext("2d");
  context.drawImage(edit.image, 0, 0);
  if (!edit.painted) return;
  // The painted area in red over the image.
  const overlay = document.createElement("canvas");
  overlay.width = canvas.width;
  overlay.height = canvas.height;
  const o = overlay.getContext("2d");
  o.fillStyle = "rgba(220, 40, 40, 0.45)";
  o.fillRect(0, 0, overlay.width, overlay.height);
  o.globalCompositeOperation = "destination-out";
  o.drawImage(edit.mask, 0, 0);
  context.drawImage(overlay, 0, 0);
}

function clearMask() {
  const context = edit.mask.getContext("2d");
  context.globalCompositeOperation = "source-over";
  context.fillStyle = "#000";
  context.fillRect(0, 0, edit.mask.width, edit.mask.height);
  edit.painted = false;
  drawEdit();
}

async function chooseImage(file) {
  if (!file) return;
  const url = URL.createObjectURL(file);
  const image = new Image();
  image.src = url;
  try {
    await image.decode();
  } catch {
    setStatus("that file is not an image this page can show", true);
    return;
  }
  edit.file = file;
  edit.image = image;
  const canvas = $("edit-canvas");
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  edit.mask = document.createElement("canvas");
  edit.mask.width = canvas.width;
  edit.mask.height = canvas.height;
  canvas.hidden = false;
  $("mask-tools").hidden = false;
  clearMask();
}

function paint(event) {
  if (!edit.image || !(event.buttons & 1)) return;
  const canvas = $("edit-canvas");
  const box = canvas.getBoundingClientRect();
  const x = ((event.clientX - box.left) * canvas.width) / box.width;
  const y = ((event.clientY - box.top) * canvas.height) / box.height;
  const context = edit.mask.getContext("2d");
  context.globalCompositeOperation = "destination-out";
  context.beginPath();
  context.arc(x, y, Math.max(canvas.width, canvas.height) / 24, 0, 2 * Math.PI);
  context.fill();
  edit.painted = true;
  drawEdit();
}

function maskBlob() {
  return new Promise((resolve) => edit.mask.toBlob(resolve, "image/png"));
}

// The edit's multipart form: the same fields as a generation, as text, and the files.
async function editForm(body) {
  const form = new FormData();
  form.append("image", edit.file);
  if (edit.painted) form.append("mask", await maskBlob(), "mask.png");
  else if ($("mask-file").files[0]) form.append("mask", $("mask-file").files[0]);
  for (const [name, value] of Object.entries(body)) {
    if (name !== "lora") form.append(name, String(value));
  }
  form.append("strength", $("strength").value);
  return form;
}

async function generate(event) {
  event.preventDefault();
  const n = Number($("n").value) || 1;
  const seed = $("seed").value === "" ? randomSeed() : Number($("seed").value);
  const body = {
    prompt: $("prompt").value,
    size: chosenSize(),
    n,
    seed,
    num_inference_steps: Number($("steps").value),
    stream: true,
    partial_images: Number($("partials").value),
    stream_progress: true,
  };
  if ($("adapter").value) body.lora = [{ name: $("adapter").value, scale: Number($("adapter-scale").value) }];
  const editing = $("mode").value === "edit";
  if (editing && !edit.file) {
    setStatus("choose an image to edit first", true);
    return;
  }
  const button = $("generate");
  button.disabled = true;
  setStatus("sending…");
  const progress = $("progress");
  progress.hidden = false;
  progress.value = 0;
  const cards = [];
  const results = $("results");
  let finished = 0;
  try {
    let response;
    if (editing) {
      const auth = headers();
      delete auth["Content-Type"]; // the browser writes the multipart boundary
      response = await fetch("v1/images/edits", { method: "POST", headers: auth, body: await editForm(body) });
    } else {
      response = await fetch("v1/images/generations", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(body),
      });
    }
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try {
        message = (await response.json()).error.message;
      } catch {}
      if (response.status === 401) $("key-row").hidden = false;
      throw new Error(message);
    }
    results.replaceChildren();
    for (let i = 0; i < n; i++) {
      cards.push(card(i, seed + i));
      results.append(cards[i].figure);
    }
    for await (const { event, data } of events(response)) {
      if (data.error) throw new Error(data.error.message);
      if (event === "zimage.queue") {
        setStatus(data.position > 0 ? `waiting: place ${data.position} in the queue` : "generating…");
      } else if (event === "zimage.progress") {
        progress.value = (data.images_done + data.step / data.steps) / n;
        setStatus(`step ${data.step} of ${data.steps}` + (n > 1 ? ` (${data.images_done} of ${n} images done)` : ""));
      } else if (event === "image_generation.partial_image" || event === "image_edit.partial_image") {
        const target = cards[data.image_index || 0];
        URL.revokeObjectURL(target.img.src);
        target.img.src = blobUrl(data.b64_json, data.output_format);
      } else if (event === "image_generation.completed" || event === "image_edit.completed") {
        const target = cards[data.image_index || 0];
        const url = blobUrl(data.b64_json, data.output_format);
        target.img.src = url;
        target.link.href = url;
        target.link.download = `zimage-${data.seed}.${data.output_format === "jpeg" ? "jpg" : data.output_format}`;
        target.link.hidden = false;
        finished++;
        progress.value = finished / n;
        if (finished === 1) remember({ prompt: body.prompt, size: body.size, steps: body.num_inference_steps, seed, n, lora: body.lora }, url);
      }
    }
    if (finished < n) throw new Error("the stream ended before every image came");
    setStatus(n > 1 ? `${n} images done` : "done");
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    button.disabled = false;
    progress.hidden = true;
  }
}

$("size").addEventListener("change", () => {
  $("custom-size").hidden = $("size").value !== "custom";
});
$("mode").addEventListener("change", () => {
  const editing = $("mode").value === "edit";
  $("edit-row").hidden = !editing;
  $("generate").textContent = editing ? "Edit" : "Generate";
  // LoRA adapters are for generations.
  $("adapter-row").hidden = editing || config.adapters.length === 0;
  // An edit's size is the image's unless another is chosen.
  const size = $("size");
  const auto = [...size.options].find((o) => o.value === "auto");
  if (editing && !auto) {
    size.add(new Option("the image's", "auto"), 0);
    size.value = "auto";
  } else if (!editing && auto) {
    auto.remove();
    size.value = config.default_size;
  }
  $("custom-size").hidden = size.value !== "custom";
});
$("edit-image").addEventListener("change", () => chooseImage($("edit-image").files[0]));
$("drop").addEventListener("dragover", (event) => {
  event.preventDefault();
  $("drop").classList.add("over");
});
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (event) => {
  event.preventDefault();
  $("drop").classList.remove("over");
  chooseImage(event.dataTransfer.files[0]);
});
$("edit-canvas").addEventListener("pointerdown", paint);
$("edit-canvas").addEventListener("pointermove", paint);
$("clear-mask").addEventListener("click", clearMask);
$("strength").addEventListener("input", showStrength);
showStrength();
$("adapter").addEventListener("change", () => {
  $("adapter-scale").value = adapterDefault($("adapter").value);
  showScale();
});
$("adapter-scale").addEventListener("input", showScale);
$("random-seed").addEventListener("click", () => {
  $("seed").value = randomSeed();
});
$("api-key").addEventListener("change", () => {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
});
$("forget-key").addEventListener("click", () => {
  localStorage.removeItem(KEY);
  $("api-key").value = "";
});
$("clear-history").addEventListener("click", () => {
  localStorage.removeItem(HISTORY);
  renderHistory();
});
$("form").addEventListener("submit", generate);

loadConfig().then(renderHistory, (error) => setStatus("could not load the settings: " + error.message, true));
pollHealth();
setInterval(pollHealth, 5000);
