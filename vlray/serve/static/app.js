// vlray search page: plain JS, no build step, no external resources.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { query: null, offset: 0, nextOffset: null, apiKey: sessionStorage.getItem("vlrayApiKey") || "" };

function headers() {
  return state.apiKey ? { "x-api-key": state.apiKey } : {};
}

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = Object.assign({}, opts.headers || {}, headers());
  const response = await fetch(path, opts);
  if (response.status === 401) {
    $("key-box").hidden = false;
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (e) { /* not JSON */ }
    throw new Error(response.status + ": " + detail);
  }
  return response;
}

async function loadThumb(link, holder) {
  try {
    const response = await api(link);
    const url = URL.createObjectURL(await response.blob());
    const img = document.createElement("img");
    img.src = url;
    img.alt = "";
    holder.textContent = "";
    holder.appendChild(img);
  } catch (e) { /* keep the placeholder */ }
}

// COCO RLE counts as pycocotools writes them (rleToString): 5 bits per char, offset 48,
// continuation bit 0x20, sign bit 0x10 on the last char, counts after the 2nd as deltas.
function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

const PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
  [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]];

// The masks drawn at most `side` pixels wide/high: each output pixel samples the source pixel
// under its centre, walking the column-major runs once per mask.
function maskCanvas(masks, side) {
  if (!masks.length) return null;
  const [h, w] = masks[0].segmentation.size;
  const s = Math.min(1, side / Math.max(h, w));
  const th = Math.max(1, Math.round(h * s)), tw = Math.max(1, Math.round(w * s));
  const canvas = document.createElement("canvas");
  canvas.width = tw; canvas.height = th; canvas.className = "masks";
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(tw, th);
  masks.forEach((mask, i) => {
    const counts = rleCounts(mask.segmentation.counts);
    const [r, g, b] = PALETTE[i % PALETTE.length];
    let run = 0, start = 0, end = counts[0] || 0;
    for (let ox = 0; ox < tw; ox++) {
      const x = Math.min(w - 1, Math.floor((ox + 0.5) / s));
      for (let oy = 0; oy < th; oy++) {
        const idx = x * h + Math.min(h - 1, Math.floor((oy + 0.5) / s));
        if (idx < start) { run = 0; start = 0; end = counts[0] || 0; }
        while (idx >= end && run < counts.length - 1) { run++; start = end; end += counts[run]; }
        if (run % 2 === 1 && idx < end) {
          const o = 4 * (oy * tw + ox);
          image.data[o] = r; image.data[o + 1] = g; image.data[o + 2] = b; image.data[o + 3] = 110;
        }
      }
    }
  });
  ctx.putImageData(image, 0, 0);
  return canvas;
}

// A region hit's box (source pixels) outlined on its mask canvas, at the canvas's scale.
function drawBox(canvas, bbox, width) {
  const s = canvas.width / width;
  const ctx = canvas.getContext("2d");
  ctx.strokeStyle = "rgb(255, 255, 255)";
  ctx.lineWidth = 2;
  ctx.strokeRect(bbox[0] * s + 1, bbox[1] * s + 1, Math.max(1, bbox[2] * s - 2), Math.max(1, bbox[3] * s - 2));
  ctx.strokeStyle = "rgb(230, 25, 75)";
  ctx.lineWidth = 1;
  ctx.strokeRect(bbox[0] * s + 0.5, bbox[1] * s + 0.5, bbox[2] * s, bbox[3] * s);
}

// Region hits: only the hit's mask, and its box; image hits: every mask of the image.
async function loadMasks(hit, holder) {
  try {
    const body = await (await api(hit.masks)).json();
    const region = hit.mask_id !== undefined;
    const masks = region ? body.masks.filter((m) => m.mask_id === hit.mask_id) : body.masks;
    const canvas = maskCanvas(masks, 256);
    if (!canvas) return;
    canvas.title = region ? "region " + hit.mask_id : body.masks.length + " masks";
    if (region && hit.bbox) drawBox(canvas, hit.bbox, masks[0].segmentation.size[1]);
    holder.appendChild(canvas);
  } catch (e) { /* no overlay */ }
}

function params() {
  const p = new URLSearchParams();
  p.set("k", String(Math.max(1, parseInt($("k").value, 10) || 20)));
  p.set("offset", String(state.offset));
  const min = $("min-score").value;
  if (min !== "") p.set("min_score", min);
  if ($("regions").checked) {
    p.set("regions", "true");
    if ($("per-image").checked) p.set("per_image", "1");
  }
  return p;
}

async function run() {
  const q = state.query;
  if (!q) return;
  const p = params();
  setStatus("searching...");
  try {
    let response;
    if (q.kind === "text") {
      p.set("q", q.text);
      response = await api("api/search/text?" + p);
    } else if (q.kind === "id") {
      p.set("id", q.id);
      response = await api("api/search/id?" + p);
    } else {
      const form = new FormData();
      form.append("file", q.file, q.file.name || "upload");
      response = await api("api/search/image?" + p, { method: "POST", body: form });
    }
    const body = await response.json();
    render(body);
    setStatus(body.hits.length + " results (" + body.kind + " query, " + body.took_ms.toFixed(1) + " ms)");
  } catch (e) {
    $("grid").textContent = "";
    setStatus(e.message, true);
  }
}

function render(body) {
  const grid = $("grid");
  grid.textContent = "";
  for (const hit of body.hits) {
    const card = document.createElement("div");
    card.className = "hit";
    card.dataset.id = hit.id;
    card.title = "Click for neighbours of " + hit.id;
    const thumb = document.createElement("div");
    thumb.className = "thumb";
    thumb.textContent = hit.width && hit.height ? hit.width + "\u00d7" + hit.height : "no thumbnail";
    if (hit.thumbnail) {
      loadThumb(hit.thumbnail, thumb).then(() => { if (hit.masks) loadMasks(hit, thumb); });
    }
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = "#" + hit.rank + "  " + hit.score.toFixed(4) +
      (hit.probability !== undefined ? "  p=" + hit.probability.toFixed(3) : "") +
      (hit.mask_id !== undefined ? "  region " + hit.mask_id : "");
    const id = document.createElement("div");
    id.className = "id";
    id.textContent = hit.id;
    card.append(thumb, score, id);
    const caption = hit.metadata && hit.metadata.caption;
    if (caption !== undefined && caption !== null && caption !== "") {
      const text = document.createElement("div");
      text.className = "caption";
      text.textContent = String(caption);
      card.appendChild(text);
    }
    const original = originalLink(hit);
    if (original) {
      const a = document.createElement("a");
      a.className = "original";
      a.href = original;
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      a.textContent = "original";
      a.addEventListener("click", (ev) => ev.stopPropagation());
      card.appendChild(a);
    }
    if (hit.width && hit.height) {
      const size = document.createElement("div");
      size.className = "size";
      size.textContent = hit.width + " \u00d7 " + hit.height;
      card.appendChild(size);
    }
    card.addEventListener("click", () => search({ kind: "id", id: hit.id }));
    grid.appendChild(card);
  }
  state.nextOffset = body.next_offset === undefined ? null : body.next_offset;
  $("next").disabled = state.nextOffset === null;
  $("prev").disabled = state.offset === 0;
}

// Where the original image can be opened: an http(s) URI in the id or in a kept column
// commonly holding it (url, uri, source, image); never a local path or s3:// key.
const ORIGINAL_KEYS = ["url", "uri", "source", "image", "image_url", "path"];

function originalLink(hit) {
  const candidates = [hit.id];
  const meta = hit.metadata || {};
  for (const key of ORIGINAL_KEYS) candidates.push(meta[key]);
  for (const value of candidates) {
    if (typeof value === "string" && /^https?:\/\/[^\s]+$/i.test(value)) return value;
  }
  return null;
}

// The query lives in the URL (/?q=text or /?id=ID, plus k, offset and min_score when not the
// defaults), so a result page can be linked, reloaded and walked with Back / Forward.
function queryToUrl(q) {
  const p = new URLSearchParams();
  if (q.kind === "text") p.set("q", q.text);
  else if (q.kind === "id") p.set("id", q.id);
  else return null; // an uploaded image cannot be put in a link
  const k = $("k").value;
  if (k && k !== "20") p.set("k", k);
  if (state.offset) p.set("offset", String(state.offset));
  const min = $("min-score").value;
  if (min !== "") p.set("min_score", min);
  if ($("regions").checked) p.set("regions", $("per-image").checked ? "1" : "all");
  return "?" + p.toString();
}

function remember(q) {
  const search = queryToUrl(q);
  const url = search === null ? location.pathname : location.pathname + search;
  if (url !== location.pathname + location.search) history.pushState(null, "", url);
}

function queryFromUrl() {
  const p = new URLSearchParams(location.search);
  if (p.get("k")) $("k").value = p.get("k");
  if (p.get("min_score") !== null) $("min-score").value = p.get("min_score");
  $("regions").checked = p.get("regions") !== null;
  $("per-image").checked = p.get("regions") === "1";
  const offset = Math.max(0, parseInt(p.get("offset"), 10) || 0);
  if (p.get("q")) {
    $("q").value = p.get("q");
    return { query: { kind: "text", text: p.get("q") }, offset: offset };
  }
  if (p.get("id")) return { query: { kind: "id", id: p.get("id") }, offset: offset };
  return null;
}

function runFromUrl() {
  const found = queryFromUrl();
  if (!found) {
    state.query = null;
    $("grid").textContent = "";
    $("query-view").textContent = "";
    setStatus("");
    return;
  }
  state.query = found.query;
  state.offset = found.offset;
  showQuery(found.query);
  run();
}

function showQuery(q) {
  const view = $("query-view");
  view.textContent = "";
  if (q.kind === "text") view.textContent = "Text: \u201c" + q.text + "\u201d";
  if (q.kind === "id") view.textContent = "Neighbours of " + q.id;
  if (q.kind === "image") {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(q.file);
    img.alt = "query image";
    view.append("Image: ", img);
  }
}

function search(q) {
  state.query = q;
  state.offset = 0;
  remember(q);
  showQuery(q);
  run();
}

function uploadFile(file) {
  if (file) search({ kind: "image", file: file });
}

async function loadInfo() {
  try {
    const info = await (await api("api/info")).json();
    $("info").textContent = info.count + " vectors \u00b7 " + (info.model || "?") +
      " (" + (info.weights || "?") + " weights) \u00b7 " + (info.created_at || "");
    $("k").max = String(info.max_k);
    if (!info.text_search) $("q").placeholder = "This model has no text tower: upload an image";
    $("region-box").hidden = !info.regions;
    if (info.regions) $("info").textContent += " \u00b7 " + info.regions + " regions";
  } catch (e) {
    $("info").textContent = e.message;
  }
}

$("text-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("q").value.trim();
  if (text) search({ kind: "text", text: text });
});
$("file").addEventListener("change", (ev) => uploadFile(ev.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  uploadFile(ev.dataTransfer.files[0]);
});
$("next").addEventListener("click", () => {
  if (state.nextOffset !== null) { state.offset = state.nextOffset; remember(state.query); run(); }
});
$("prev").addEventListener("click", () => {
  const k = Math.max(1, parseInt($("k").value, 10) || 20);
  state.offset = Math.max(0, state.offset - k);
  remember(state.query);
  run();
});
window.addEventListener("popstate", runFromUrl);
for (const box of ["regions", "per-image"]) {
  $(box).addEventListener("change", () => {
    if (state.query) { state.offset = 0; remember(state.query); run(); }
  });
}
$("key-save").addEventListener("click", () => {
  state.apiKey = $("api-key").value;
  sessionStorage.setItem("vlrayApiKey", state.apiKey);
  $("key-box").hidden = true;
  loadInfo();
  run();
});
loadInfo();
runFromUrl();
