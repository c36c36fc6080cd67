// The Osprey web page: plain JS over the v1 API (no build step).
"use strict";

const MAX_SIDE = 800;           // the canvas shows the image at most this large
const ALPHA = 0.45;
const state = { image: null, data: null, scale: 1, masks: [], labels: [], selected: -1, drag: null };
const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");

function colour(i) {
  // Distinct hues a golden-ratio step apart (as the batch job's overlays).
  const h = (i * 0.618033988749895) % 1;
  return `hsl(${Math.round(h * 360)}, 75%, 50%)`;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function api(path, body) {
  const headers = { "Content-Type": "application/json" };
  const token = $("token").value.trim();
  if (token) headers["Authorization"] = `Bearer ${token}`;
  const response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
  const payload = await response.json().catch(() => ({}));
  if (!response.ok) {
    const e = payload.error || {};
    throw new Error(`${response.status}: ${e.field ? e.field + ": " : ""}${e.message || response.statusText}`);
  }
  return payload;
}

async function* streamChat(messages, regions) {
  // Tokens of the answer as the server decodes them: POST /v1/chat/completions, stream: true.
  const headers = { "Content-Type": "application/json" };
  const token = $("token").value.trim();
  if (token) headers["Authorization"] = `Bearer ${token}`;
  const body = { model: "osprey", stream: true, messages, regions };
  const response = await fetch("v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body) });
  if (!response.ok) {
    const e = (await response.json().catch(() => ({}))).error || {};
    throw new Error(`${response.status}: ${e.param ? e.param + ": " : ""}${e.message || response.statusText}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
      if (delta) yield delta;
    }
  }
}

function chatMessages(turns) {
  // The image travels in the first user turn, as an OpenAI image_url part.
  return turns.map((t, k) => ({
    role: t.role,
    content: k === 0 ? [{ type: "image_url", image_url: { url: state.data } }, { type: "text", text: t.text }] : t.text,
  }));
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot show this image"));
    img.src = src;
  });
}

async function tinted(mask, i) {
  // The mask PNG filled with the region's colour, as an image the size of the picture.
  const img = await loadImage(`data:image/png;base64,${mask.png}`);
  const off = document.createElement("canvas");
  off.width = img.width; off.height = img.height;
  const o = off.getContext("2d");
  o.drawImage(img, 0, 0);
  // The PNG is black (0) outside and white inside: keep the white pixels only.
  const pixels = o.getImageData(0, 0, off.width, off.height);
  for (let p = 0; p < pixels.data.length; p += 4) pixels.data[p + 3] = pixels.data[p] > 0 ? 255 : 0;
  o.putImageData(pixels, 0, 0);
  o.globalCompositeOperation = "source-in";
  o.fillStyle = colour(i);
  o.fillRect(0, 0, off.width, off.height);
  return off;
}

function draw() {
  if (!state.image) return;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  state.masks.forEach((m, i) => {
    ctx.globalAlpha = i === state.selected ? 0.65 : ALPHA;
    ctx.drawImage(m.tint, 0, 0, canvas.width, canvas.height);
  });
  ctx.globalAlpha = 1;
  ctx.font = "13px sans-serif";
  state.masks.forEach((m, i) => {
    const text = state.labels[i] || "";
    const short = text.length > 24 ? `${text.slice(0, 23)}\u2026` : text;  // the list shows it all
    const label = short ? `${i + 1}: ${short}` : `${i + 1}`;
    const x = m.bbox[0] * state.scale, y = m.bbox[1] * state.scale;
    const w = ctx.measureText(label).width + 6;
    ctx.fillStyle = "rgba(0,0,0,0.7)";
    ctx.fillRect(x, y, w, 17);
    ctx.fillStyle = "white";
    ctx.fillText(label, x + 3, y + 13);
  });
  if (state.drag && state.drag.moved) {
    const d = state.drag;
    ctx.strokeStyle = "#ffcc00";
    ctx.lineWidth = 2;
    ctx.strokeRect(d.x0, d.y0, d.x1 - d.x0, d.y1 - d.y0);
  }
  canvas.dataset.masks = String(state.masks.length);
}

function listRegions() {
  const list = $("regions");
  list.innerHTML = "";
  state.masks.forEach((m, i) => {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = colour(i);
    li.appendChild(sw);
    li.appendChild(document.createTextNode(state.labels[i] || `region ${i + 1} (${m.area} px)`));
    if (i === state.selected) li.className = "selected";
    li.onclick = () => { state.selected = i; listRegions(); draw(); };
    list.appendChild(li);
  });
  const any = state.masks.length > 0;
  $("describe").disabled = !any;
  $("clear").disabled = !any;
  $("ask").disabled = !state.image;
}

async function showMasks(masks) {
  state.masks = await Promise.all(masks.map(async (m, i) => ({ ...m, tint: await tinted(m, i) })));
  state.labels = masks.map(() => "");
  state.selected = state.masks.length ? 0 : -1;
  listRegions();
  draw();
}

async function segment(request, what) {
  status(`Segmenting (${what})...`);
  try {
    const out = await api("v1/segment", { image: state.data, return_png: true, ...request });
    await showMasks(out.masks);
    $("caption").textContent = "";
    status(`${out.masks.length} mask(s) from ${what} (${out.segmenter}). Click "Describe".`);
    return out.masks;
  } catch (e) {
    status(`Segmentation failed: ${e.message}`, true);
    return [];
  }
}

async function describe(indices, tasks) {
  const regions = indices.map((i) => ({ rle: state.masks[i].rle }));
  const out = await api("v1/describe", { image: state.data, regions, tasks });
  indices.forEach((i, k) => { state.labels[i] = out.answers[k].category || out.answers[k].short || ""; });
  listRegions();
  draw();
  return out.answers;
}

function toImage(ev) {
  const rect = canvas.getBoundingClientRect();
  const sx = canvas.width / rect.width, sy = canvas.height / rect.height;
  return [(ev.clientX - rect.left) * sx, (ev.clientY - rect.top) * sy];
}

canvas.addEventListener("mousedown", (ev) => {
  if (!state.image) return;
  const [x, y] = toImage(ev);
  state.drag = { x0: x, y0: y, x1: x, y1: y, moved: false };
});
canvas.addEventListener("mousemove", (ev) => {
  if (!state.drag) return;
  const [x, y] = toImage(ev);
  Object.assign(state.drag, { x1: x, y1: y });
  state.drag.moved = Math.abs(x - state.drag.x0) + Math.abs(y - state.drag.y0) > 6;
  draw();
});
canvas.addEventListener("mouseup", async (ev) => {
  const d = state.drag;
  state.drag = null;
  if (!d) return;
  const [x, y] = toImage(ev);
  const s = state.scale;
  if (d.moved) {
    const box = [Math.min(d.x0, x) / s, Math.min(d.y0, y) / s, Math.max(d.x0, x) / s, Math.max(d.y0, y) / s];
    await segment({ boxes: [box] }, "a box");
  } else {
    const w = state.image.naturalWidth, h = state.image.naturalHeight;
    const point = [Math.min(x / s, w - 1), Math.min(y / s, h - 1)];
    await segment({ points: [point] }, "a point");
  }
});

$("file").addEventListener("change", async () => {
  const file = $("file").files[0];
  if (!file) return;
  const data = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  try {
    state.image = await loadImage(data);
  } catch (e) {
    status(e.message, true);
    return;
  }
  state.data = data;
  const w = state.image.naturalWidth, h = state.image.naturalHeight;
  state.scale = Math.min(1, MAX_SIDE / Math.max(w, h));
  if (Math.max(w, h) < 320) state.scale = 320 / Math.max(w, h);  // small images are enlarged
  canvas.width = Math.round(w * state.scale);
  canvas.height = Math.round(h * state.scale);
  state.masks = []; state.labels = [];
  conversation.length = 0;
  $("chat").textContent = "";
  $("everything").disabled = false;
  $("caption").textContent = "";
  listRegions();
  draw();
  status(`${file.name}: ${w}x${h}. Click a point or drag a box.`);
});

$("describe").addEventListener("click", async () => {
  const i = state.selected >= 0 ? state.selected : 0;
  status("Describing...");
  try {
    const [answer] = await describe([i], ["category"]);
    const head = `Region ${i + 1}\ncategory: ${answer.category}\ncaption: `;
    $("caption").textContent = head;
    // The caption streams in as it decodes.
    const turns = [{ role: "user", text: "Please give me a short description of <region1>. Using a short phrase." }];
    let text = "";
    for await (const delta of streamChat(chatMessages(turns), [{ rle: state.masks[i].rle }])) {
      text += delta;
      $("caption").textContent = head + text;
    }
    $("caption").dataset.done = "1";
    status("Described.");
  } catch (e) {
    status(`Describe failed: ${e.message}`, true);
  }
});

const conversation = [];
$("chat-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (!question || !state.image) return;
  $("question").value = "";
  conversation.push({ role: "user", text: question });
  const line = document.createElement("div");
  const who = document.createElement("span");
  who.className = "user";
  who.textContent = `You: ${question}\n`;
  const answer = document.createElement("span");
  answer.className = "answer";
  line.append(who, answer);
  $("chat").appendChild(line);
  status("Answering...");
  const regions = state.masks.map((m) => ({ rle: m.rle }));
  let text = "";
  try {
    for await (const delta of streamChat(chatMessages(conversation), regions)) {
      text += delta;
      answer.textContent = text;
    }
    conversation.push({ role: "assistant", text });
    line.dataset.done = "1";
    status("Answered.");
  } catch (e) {
    conversation.pop();
    status(`Chat failed: ${e.message}`, true);
  }
});

$("everything").addEventListener("click", async () => {
  const masks = await segment({ everything: true }, "everything");
  if (!masks.length) return;
  status(`Labelling ${masks.length} region(s)...`);
  try {
    await describe(masks.map((_, i) => i), ["category"]);
    status(`${masks.length} region(s) labelled.`);
  } catch (e) {
    status(`Labelling failed: ${e.message}`, true);
  }
});

$("clear").addEventListener("click", () => {
  state.masks = []; state.labels = []; state.selected = -1;
  $("caption").textContent = "";
  listRegions();
  draw();
});

$("token").value = localStorage.getItem("osprey-token") || "";
$("token").addEventListener("change", () => localStorage.setItem("osprey-token", $("token").value.trim()));
