// psearch search page: browse the gallery, draw (or click) a box, show ranked matches.
// Plain JavaScript talking to the API of `psearch serve`; no library, nothing from a CDN.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const PAGE = 60;

const state = {
  offset: 0,
  query: null, // {imageId | file, width, height}
  box: null, // [x1, y1, x2, y2] pixels, drawn or typed
  detectionId: null, // a clicked detection instead of a box
  busy: false,
};

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function setStatus(text, busy = false) {
  $("status-text").textContent = text;
  $("progress").hidden = !busy;
  state.busy = busy;
  $("search").disabled = busy || !canSearch();
  document.body.setAttribute("aria-busy", busy ? "true" : "false");
}

function canSearch() {
  return state.query !== null && (state.box !== null || state.detectionId !== null);
}

// ---------------------------------------------------------------- version and gallery

async function loadVersion() {
  try {
    const v = await api("/version");
    const el = $("version");
    el.textContent = `model ${v.model.version} · index ${v.index.kind}, ${v.index.detections} detections · data ${v.data_version}`;
    if (!v.index_matches_model) {
      const warn = document.createElement("span");
      warn.className = "warn";
      warn.textContent = " · the model is not the one that built the index";
      el.append(warn);
    }
  } catch (err) {
    $("version").textContent = `version unavailable: ${err.message}`;
  }
}

async function loadGallery() {
  try {
    const page = await api(`/images?offset=${state.offset}&limit=${PAGE}`);
    $("gallery-count").textContent = `(${page.total})`;
    for (const image of page.images) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.imageId = image.image_id;
      button.setAttribute("aria-pressed", "false");
      const where = image.video == null ? "" : `, ${placeText(image)}`;
      button.setAttribute("aria-label", `gallery image ${image.image_id}${where}, ${image.detections} detections`);
      button.title = placeText(image);
      const thumb = document.createElement("img");
      thumb.src = image.url;
      thumb.alt = "";
      thumb.loading = "lazy";
      button.append(thumb);
      button.addEventListener("click", () => openGalleryImage(image, button));
      item.append(button);
      $("gallery").append(item);
    }
    state.offset += page.images.length;
    $("more").hidden = state.offset >= page.total;
  } catch (err) {
    setStatus(`cannot list the gallery: ${err.message}`);
  }
}

// ---------------------------------------------------------------- the query image

function resetQuery(query, src) {
  state.query = query;
  state.box = null;
  state.detectionId = null;
  $("box").value = "";
  const img = $("scene");
  img.src = src;
  img.alt = query.imageId !== undefined ? `gallery image ${query.imageId}` : "uploaded image";
  $("stage").hidden = false;
  $("overlay").setAttribute("viewBox", `0 0 ${query.width} ${query.height}`);
  $("overlay").setAttribute("preserveAspectRatio", "none");
  $("overlay").replaceChildren();
  setStatus("Drag a box around a person, or click a detected box.");
}

async function openGalleryImage(image, button) {
  for (const b of document.querySelectorAll(".gallery button")) b.setAttribute("aria-pressed", "false");
  button.setAttribute("aria-pressed", "true");
  resetQuery({ imageId: image.image_id, width: image.width, height: image.height }, image.url);
  try {
    const found = await api(`/images/${image.image_id}/detections`);
    for (const det of found.detections) addDetectionBox(det);
  } catch (err) {
    setStatus(`cannot load detections: ${err.message}`);
  }
}

function openUpload(file) {
  const url = URL.createObjectURL(file);
  const probe = new Image();
  probe.onload = () => {
    for (const b of document.querySelectorAll(".gallery button")) b.setAttribute("aria-pressed", "false");
    resetQuery({ file, width: probe.naturalWidth, height: probe.naturalHeight }, url);
  };
  probe.onerror = () => setStatus(`${file.name}: not an image the browser can show`);
  probe.src = url;
}

function svgRect(cls, [x1, y1, x2, y2]) {
  const rect = document.createElementNS(SVG, "rect");
  rect.setAttribute("class", cls);
  rect.setAttribute("x", x1);
  rect.setAttribute("y", y1);
  rect.setAttribute("width", Math.max(1, x2 - x1));
  rect.setAttribute("height", Math.max(1, y2 - y1));
  return rect;
}

function addDetectionBox(det) {
  const rect = svgRect("det", det.box);
  rect.setAttribute("tabindex", "0");
  rect.setAttribute("role", "button");
  rect.setAttribute("aria-label", `detected person, score ${det.score.toFixed(2)}: search for them`);
  rect.dataset.detectionId = det.detection_id;
  const pick = (event) => {
    event.preventDefault();
    event.stopPropagation();
    chooseDetection(det);
    runSearch();
  };
  rect.addEventListener("pointerdown", (event) => event.stopPropagation());
  rect.addEventListener("click", pick);
  rect.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") pick(event);
  });
  $("overlay").append(rect);
}

function chooseDetection(det) {
  state.detectionId = det.detection_id;
  state.box = det.box;
  showDrawn(det.box);
  $("box").value = boxText(det.box);
}

function boxText([x1, y1, x2, y2]) {
  return [x1, y1, x2 - x1, y2 - y1].map((v) => Math.round(v)).join(",");
}

function showDrawn(box) {
  for (const old of $("overlay").querySelectorAll(".drawn")) old.remove();
  if (box) $("overlay").append(svgRect("drawn", box));
  $("search").disabled = state.busy || !canSearch();
}

// Drawing: pointer coordinates -> image pixels via the overlay's on-screen size.
function toPixels(event) {
  const r = $("overlay").getBoundingClientRect();
  const x = ((event.clientX - r.left) * state.query.width) / r.width;
  const y = ((event.clientY - r.top) * state.query.height) / r.height;
  return [Math.min(Math.max(x, 0), state.query.width), Math.min(Math.max(y, 0), state.query.height)];
}

function enableDrawing() {
  const overlay = $("overlay");
  let start = null;
  overlay.addEventListener("pointerdown", (event) => {
    if (!state.query || event.button !== 0) return;
    start = toPixels(event);
    overlay.setPointerCapture(event.pointerId);
    event.preventDefault();
  });
  overlay.addEventListener("pointermove", (event) => {
    if (!start) return;
    const [x, y] = toPixels(event);
    showDrawn([Math.min(start[0], x), Math.min(start[1], y), Math.max(start[0], x), Math.max(start[1], y)]);
  });
  overlay.addEventListener("pointerup", (event) => {
    if (!start) return;
    const [x, y] = toPixels(event);
    const box = [Math.min(start[0], x), Math.min(start[1], y), Math.max(start[0], x), Math.max(start[1], y)];
    start = null;
    if (box[2] - box[0] < 4 || box[3] - box[1] < 4) {
      showDrawn(state.box);
      return;
    }
    state.box = box.map((v) => Math.round(v));
    state.detectionId = null;
    $("box").value = boxText(state.box);
    showDrawn(state.box);
    setStatus("Box drawn: press Search (or Enter).");
  });
}

// Typing a box (keyboard users): x,y,w,h in pixels.
function onBoxTyped() {
  const parts = $("box").value.split(",").map((v) => Number(v.trim()));
  state.detectionId = null;
  if (parts.length === 4 && parts.every(Number.isFinite) && parts[2] > 0 && parts[3] > 0) {
    const [x, y, w, h] = parts;
    state.box = [x, y, x + w, y + h];
  } else {
    state.box = null;
  }
  if (state.query) showDrawn(state.box);
}

// ---------------------------------------------------------------- searching

async function runSearch() {
  if (!canSearch() || state.busy) return;
  const form = new FormData();
  if (state.detectionId !== null) {
    form.append("detection_id", state.detectionId);
  } else {
    if (state.query.file) form.append("image", state.query.file);
    else form.append("image_id", state.query.imageId);
    form.append("box", boxText(state.box));
  }
  form.append("top_k", $("top-k").value || "10");
  setStatus("Searching…", true);
  $("results").setAttribute("aria-busy", "true");
  try {
    const result = await api("/search", { method: "POST", body: form });
    showResults(result);
    setStatus(`${result.matches.length} matches in ${(result.seconds * 1000).toFixed(0)} ms.`);
  } catch (err) {
    setStatus(`Search failed: ${err.message}`);
  } finally {
    $("results").setAttribute("aria-busy", "false");
    $("search").disabled = !canSearch();
  }
}

// "cam1.mp4 @ 0:12.50 (frame 300)" for a video frame (a match or a gallery image),
// "image 17" for an image file.
function placeText(match) {
  if (match.video == null) return `image ${match.image_id}`;
  const name = match.video.split(/[\\/]/).pop();
  const minutes = Math.floor(match.time_s / 60);
  const seconds = (match.time_s - minutes * 60).toFixed(2).padStart(5, "0");
  return `${name} @ ${minutes}:${seconds} (frame ${match.frame})`;
}

function showResults(result) {
  const list = $("results");
  list.replaceChildren();
  for (const match of result.matches) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "match";
    button.setAttribute(
      "aria-label",
      `rank ${match.rank}, similarity ${match.similarity.toFixed(3)}, ${placeText(match)}: open in its scene`,
    );
    const crop = document.createElement("img");
    crop.src = match.crop_url;
    crop.alt = "";
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.append(
      `#${match.rank} · sim ${match.similarity.toFixed(3)}`,
      document.createElement("br"),
      `det ${match.score.toFixed(2)} · ${placeText(match)}`,
    );
    button.append(crop, meta);
    button.addEventListener("click", () => openMatch(match));
    item.append(button);
    list.append(item);
  }
}

function openMatch(match) {
  const dialog = $("viewer");
  $("viewer-title").textContent = `Match #${match.rank} in ${placeText(match)}`;
  const img = $("viewer-image");
  img.alt = `gallery image ${match.image_id} with the matched person boxed`;
  const overlay = $("viewer-overlay");
  overlay.replaceChildren();
  img.onload = () => {
    overlay.setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
    overlay.setAttribute("preserveAspectRatio", "none");
    overlay.replaceChildren(svgRect("match", match.box));
  };
  img.src = match.image_url;
  $("viewer-caption").textContent =
    `similarity ${match.similarity.toFixed(4)} · detection score ${match.score.toFixed(3)} · box ${boxText(match.box)}`;
  dialog.showModal();
  $("viewer-close").focus();
}

// ---------------------------------------------------------------- wiring

document.addEventListener("DOMContentLoaded", () => {
  enableDrawing();
  $("more").addEventListener("click", loadGallery);
  $("upload").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) openUpload(file);
  });
  $("box").addEventListener("input", onBoxTyped);
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runSearch();
  });
  setStatus("");
  loadVersion();
  loadGallery();
});
