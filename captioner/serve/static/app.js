// captioner's page: plain JavaScript, no build step, nothing fetched from elsewhere.
"use strict";
const $ = (sel, root = document) => root.querySelector(sel);
const state = { model: null };

async function loadModel() {
  try {
    const r = await fetch("/api/model");
    state.model = await r.json();
    const m = state.model;
    $("#model-summary").textContent =
      `${m.decoder} decoder on ${m.encoder}` + (m.confidence ? ", with calibrated confidence" : "") +
      `. ${m.summary}`;
    $("#beam").placeholder = m.decoding.beam_size;
  } catch (e) {
    $("#model-summary").textContent = "Could not reach the server.";
  }
}

// what each failure is called in the status line ("2 captioned, 1 not an image"): [one, several]
const KINDS = [
  [/^not an image/, ["not an image", "not images"]],
  [/^is empty/, ["empty file", "empty files"]],
  [/over the limit|upload limit|too many|over this server/, ["too large", "too large"]],
  [/^unreadable|has no pixels/, ["unreadable", "unreadable"]],
  [/could not reach/, ["not sent (server unreachable)", "not sent (server unreachable)"]],
];

function failureKind(reason) {
  for (const [re, names] of KINDS) if (re.test(reason)) return names;
  return ["failed", "failed"];
}

function setStatus(text) { $("#status").textContent = text; }

// the status line counts every card's outcome: captioned, or failed and why
function updateStatus() {
  const cards = Array.from(document.querySelectorAll("#results .card"));
  if (!cards.length) { setStatus(""); return; }
  let photos = 0, sequences = 0, pending = 0;
  const failed = new Map();  // kind → [count, names]
  for (const c of cards) {
    const o = c.dataset.outcome;
    if (o === "pending") pending++;
    else if (o === "captioned") { if (c.dataset.sequence) sequences++; else photos++; }
    else {
      const names = failureKind(c.dataset.reason || "");
      const prev = failed.get(names[0]) || [0, names];
      failed.set(names[0], [prev[0] + 1, names]);
    }
  }
  const parts = [];
  if (photos) parts.push(`${photos} captioned`);
  if (sequences) parts.push(`${sequences} sequence${sequences > 1 ? "s" : ""} captioned`);
  for (const [n, names] of failed.values()) parts.push(`${n} ${n > 1 ? names[1] : names[0]}`);
  if (pending) setStatus(`Captioning… ${pending} to go` + (parts.length ? `; so far ${parts.join(", ")}` : ""));
  else setStatus(parts.join(", ") + ".");
}

function preview(file) {
  // the picture, or a plain note where the browser cannot show it (never a broken-image icon)
  const note = () => {
    const p = document.createElement("p");
    p.className = "nopreview muted";
    p.textContent = `no preview of ${file.name} in this browser`;
    return p;
  };
  if (file.type && !file.type.startsWith("image/")) return note();
  const img = document.createElement("img");
  img.src = URL.createObjectURL(file);
  img.alt = file.name;
  img.addEventListener("error", () => img.replaceWith(note()), { once: true });
  return img;
}

function newCard(files, before) {
  const card = $("#card").content.firstElementChild.cloneNode(true);
  const photo = $(".photo", card);
  $("img", photo).remove();
  if (files.length === 1) {
    photo.prepend(preview(files[0]));
  } else {  // a sequence: its frames in order
    const strip = document.createElement("div");
    strip.className = "strip";
    for (const f of files) strip.appendChild(preview(f));
    photo.prepend(strip);
    card.dataset.sequence = "1";
  }
  card.dataset.file = files.map(f => f.name).join(", ");
  card.dataset.outcome = "pending";
  $(".name", card).textContent = card.dataset.file;
  $("#results").insertBefore(card, before);
  return card;
}

function form(files) {
  const data = new FormData();
  for (const f of files) data.append("files", f, f.name);
  const beam = $("#beam").value, nbest = $("#nbest").value;
  if (beam) data.append("beam_size", beam);
  if (nbest) data.append("n_best", nbest);
  data.append("attention", "1");
  return data;
}

function showError(card, message) {
  // the file's name and the reason, and nothing else: no picture, no empty lists or headings
  card.dataset.outcome = "failed";
  card.dataset.reason = message;
  card.classList.add("failed");
  for (const sel of [".photo", ".meta", ".actions", ".nbest", ".tags-title", ".tags"]) $(sel, card)?.remove();
  const cap = $(".caption", card);
  cap.textContent = "";
  const span = document.createElement("span");
  span.className = "error";
  span.textContent = message;
  cap.appendChild(span);
  updateStatus();
}

function drawAttention(card, weights, side, crop) {
  const img = $(".photo img", card), canvas = $(".heat", card);
  if (!img || !weights) return;
  // the shown picture's box inside the <img> (object-fit: contain), then the centre square the
  // model saw (its short side resized, then cropped: `crop` of the short side)
  const bw = img.clientWidth, bh = img.clientHeight, nw = img.naturalWidth, nh = img.naturalHeight;
  const scale = Math.min(bw / nw, bh / nh), w = nw * scale, h = nh * scale;
  const s = Math.min(w, h) * crop;
  Object.assign(canvas.style, { left: `${(bw - s) / 2}px`, top: `${(bh - s) / 2}px`, width: `${s}px`, height: `${s}px` });
  canvas.width = side; canvas.height = side;
  const ctx = canvas.getContext("2d");
  const max = Math.max(...weights) || 1;
  for (let k = 0; k < weights.length; k++) {
    const v = weights[k] / max;
    ctx.fillStyle = `rgba(${Math.round(255 * v)}, ${Math.round(200 * v)}, 60, 1)`;
    ctx.fillRect(k % side, Math.floor(k / side), 1, 1);
  }
  canvas.style.imageRendering = "auto";
  canvas.classList.add("on");
}

function hideAttention(card) { $(".heat", card).classList.remove("on"); }

function percent(p) { return `${(100 * p).toFixed(0)} %`; }

// an alternative's score in words: how likely the model finds it next to its top choice
// (the log-probability itself is in the tooltip, for those who want it)
function likelihood(score, top) {
  if (score >= top - 1e-6) return "the model's top choice";
  const ratio = Math.exp(top - score);
  if (ratio < 1.5) return "about as likely as the top choice";
  if (ratio > 1000) return "far less likely than the top choice";
  return `${ratio < 10 ? ratio.toFixed(1) : ratio.toFixed(0)}× less likely than the top choice`;
}

function fill(card, r) {
  if (r.error) { showError(card, r.error); return; }
  const cap = $(".caption", card);
  cap.textContent = "";
  const text = r.caption ?? r.nbest[0].caption;
  if (r.attention) {  // each word's attention over the photo, on hover or keyboard focus
    r.attention.words.forEach((word, i) => {
      const span = document.createElement("span");
      span.className = "word";
      span.tabIndex = 0;
      span.textContent = word;
      span.setAttribute("aria-label", `${word}: show where the model looked`);
      const on = () => drawAttention(card, r.attention.weights[i], r.attention.side, r.attention.crop);
      const off = () => hideAttention(card);
      span.addEventListener("mouseenter", on); span.addEventListener("focus", on);
      span.addEventListener("mouseleave", off); span.addEventListener("blur", off);
      cap.appendChild(span);
      cap.appendChild(document.createTextNode(" "));
    });
  } else {
    cap.textContent = text;
  }
  const meta = $(".meta", card);
  if (r.confidence !== null && r.confidence !== undefined) {
    const low = r.low_confidence;  // below the server's mark (guidance.LOW_CONFIDENCE)
    const span = document.createElement("span");
    span.className = low ? "low" : "";
    span.textContent = `confidence ${percent(r.confidence)}` +
      (low ? " — low: the caption may well be wrong; the tags say what the classifier sees" : "");
    meta.appendChild(span);
  } else meta.remove();
  const copy = $(".copy", card);
  copy.disabled = false;
  copy.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(text); copy.textContent = "Copied"; }
    catch (e) {  // no clipboard access (plain http on another host): select the text instead
      const range = document.createRange(); range.selectNodeContents(cap);
      const sel = getSelection(); sel.removeAllRanges(); sel.addRange(range); copy.textContent = "Selected";
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  const nbest = r.nbest || [];
  if (nbest.length < 2) $(".nbest", card).remove();
  else {
    const list = $(".nbest ol", card), top = Math.max(...nbest.map(c => c.score));
    for (const c of nbest) {
      const li = document.createElement("li");
      li.textContent = c.caption;
      const s = document.createElement("span");
      s.className = "score";
      s.textContent = (c.confidence != null ? `confidence ${percent(c.confidence)}, ` : "") + likelihood(c.score, top);
      s.title = `log-probability ${c.score.toFixed(2)}`;
      li.appendChild(s);
      list.appendChild(li);
    }
  }
  const shown = (r.tags || []).filter(t => t.p >= 0.01);  // under 1 %: noise, not worth a line
  if (!shown.length) { $(".tags-title", card).remove(); $(".tags", card).remove(); }
  const tags = $(".tags", card);
  for (const t of shown) {
    const li = document.createElement("li");
    const label = document.createElement("span"); label.textContent = t.label;
    const p = document.createElement("span"); p.textContent = percent(t.p);
    const bar = document.createElement("span"); bar.className = "bar"; bar.style.setProperty("--p", `${100 * t.p}%`);
    li.append(label, p, bar);
    tags.appendChild(li);
  }
  card.dataset.outcome = "captioned";
  updateStatus();
}

async function post(url, files) {
  const r = await fetch(url, { method: "POST", body: form(files) });
  let body;
  try { body = await r.json(); } catch (e) { body = { error: `server answered ${r.status}` }; }
  if (!r.ok && !Array.isArray(body)) return { error: body.error || `server answered ${r.status}`, results: body.results };
  return body;
}

function tooLarge(f) {
  const mb = state.model?.limits?.max_upload_mb;
  return mb && f.size > mb * 2 ** 20 ? `larger than this server's upload limit of ${mb} MB` : null;
}

function looksLikeImage(f) { return f.type === "" || f.type.startsWith("image/"); }

async function captionPhotos(files, before) {
  // one request per photo: each caption appears as soon as it is ready, and the server
  // batches the concurrent requests into one pass of the model; every file gets a card, in order
  const cards = files.map(f => newCard([f], before));
  updateStatus();
  await Promise.all(files.map(async (f, i) => {
    const card = cards[i], big = tooLarge(f);
    if (big) { showError(card, big); return; }
    try {
      const body = await post("/api/caption", [f]);
      fill(card, Array.isArray(body) ? body[0] : (body.results ? body.results[0] : body));
    } catch (e) { showError(card, `could not reach the server (${e.message})`); }
  }));
}

async function captionSequence(files, before) {
  // files the browser knows are not images get their own card; the rest are the sequence
  const frames = files.filter(looksLikeImage);
  let card = null;
  for (const f of files) {
    if (!looksLikeImage(f)) showError(newCard([f], before), `not an image (${f.type}): left out of the sequence`);
    else if (!card) card = newCard(frames, before);
  }
  if (!card) return;
  updateStatus();
  try { fill(card, await post("/api/caption-sequence", frames)); }
  catch (e) { showError(card, `could not reach the server (${e.message})`); }
}

function handle(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  const before = $("#results").firstElementChild;  // the newest choice on top, its files in the order chosen
  if ($("#mode").value === "sequence") captionSequence(files, before); else captionPhotos(files, before);
}

const input = $("#files");
input.addEventListener("change", () => { handle(input.files); input.value = ""; });
$("#choose").addEventListener("click", e => { e.stopPropagation(); input.click(); });
$("#drop").addEventListener("click", e => { if (e.target !== input) input.click(); });
// files dropped anywhere on the page are captioned; the browser never navigates away to show them
const carriesFiles = e => Array.from(e.dataTransfer?.types || []).includes("Files");
let dragTimer = 0;
window.addEventListener("dragover", e => {
  if (!carriesFiles(e)) return;
  e.preventDefault();
  e.dataTransfer.dropEffect = "copy";
  document.body.classList.add("dragging");
  clearTimeout(dragTimer);
  dragTimer = setTimeout(() => document.body.classList.remove("dragging"), 200);
});
window.addEventListener("dragenter", e => { if (carriesFiles(e)) e.preventDefault(); });
window.addEventListener("drop", e => {
  if (!carriesFiles(e)) return;
  e.preventDefault();
  document.body.classList.remove("dragging");
  handle(e.dataTransfer.files);
});
window.addEventListener("resize", () => {  // a map drawn for the old layout would no longer fit
  for (const c of document.querySelectorAll(".heat")) { c.classList.remove("on"); c.style.width = c.style.height = "0px"; }
});
$("#clear").addEventListener("click", () => { $("#results").innerHTML = ""; setStatus(""); });
loadModel();
