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

function setStatus(text) { $("#status").textContent = text; }

function newCard(files) {
  const card = $("#card").content.firstElementChild.cloneNode(true);
  const photo = $(".photo", card);
  const img = $("img", photo);
  if (files.length === 1) {
    img.src = URL.createObjectURL(files[0]);
    img.alt = files[0].name;
  } else {  // a sequence: its frames in order
    img.remove();
    const strip = document.createElement("div");
    strip.className = "strip";
    for (const f of files) {
      const i = document.createElement("img");
      i.src = URL.createObjectURL(f);
      i.alt = f.name;
      strip.appendChild(i);
    }
    photo.prepend(strip);
  }
  card.dataset.file = files.map(f => f.name).join(", ");
  $("#results").prepend(card);
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
  const cap = $(".caption", card);
  cap.textContent = "";
  const span = document.createElement("span");
  span.className = "error";
  span.textContent = message;
  cap.appendChild(span);
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

function fill(card, r) {
  const cap = $(".caption", card);
  cap.textContent = "";
  if (r.error) { showError(card, r.error); return; }
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
    meta.innerHTML = "";
    const span = document.createElement("span");
    span.className = low ? "low" : "";
    span.textContent = `confidence ${(100 * r.confidence).toFixed(0)} %` +
      (low ? " — low: the caption may well be wrong; the tags say what the classifier sees" : "");
    meta.appendChild(span);
  }
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
  const list = $(".nbest ol", card);
  for (const c of r.nbest || []) {
    const li = document.createElement("li");
    li.textContent = c.caption;
    const s = document.createElement("span");
    s.className = "score";
    s.textContent = `log-prob ${c.score.toFixed(2)}` + (c.confidence != null ? ` · confidence ${(100 * c.confidence).toFixed(0)} %` : "");
    li.appendChild(s);
    list.appendChild(li);
  }
  if (!r.nbest || r.nbest.length < 2) $(".nbest", card).remove();
  if (!r.tags || !r.tags.length) $(".tags-title", card).remove();
  const tags = $(".tags", card);
  for (const t of r.tags || []) {
    const li = document.createElement("li");
    const label = document.createElement("span"); label.textContent = t.label;
    const p = document.createElement("span"); p.textContent = `${(100 * t.p).toFixed(0)} %`;
    const bar = document.createElement("span"); bar.className = "bar"; bar.style.setProperty("--p", `${100 * t.p}%`);
    li.append(label, p, bar);
    tags.appendChild(li);
  }
}

async function post(url, files) {
  const r = await fetch(url, { method: "POST", body: form(files) });
  let body;
  try { body = await r.json(); } catch (e) { body = { error: `server answered ${r.status}` }; }
  if (!r.ok && !Array.isArray(body)) return { error: body.error || `server answered ${r.status}`, results: body.results };
  return body;
}

async function captionPhotos(files) {
  // one request per photo: each caption appears as soon as it is ready, and the server
  // batches the concurrent requests into one pass of the model
  let done = 0;
  setStatus(`Captioning ${files.length} photo(s)…`);
  await Promise.all(files.map(async f => {
    const card = newCard([f]);
    try {
      const body = await post("/api/caption", [f]);
      fill(card, Array.isArray(body) ? body[0] : (body.results ? body.results[0] : body));
    } catch (e) { showError(card, `could not reach the server (${e.message})`); }
    done++;
    setStatus(`Captioned ${done} of ${files.length}.`);
  }));
}

async function captionSequence(files) {
  const card = newCard(files);
  setStatus(`Captioning a sequence of ${files.length} photo(s)…`);
  try { fill(card, await post("/api/caption-sequence", files)); }
  catch (e) { showError(card, `could not reach the server (${e.message})`); }
  setStatus("Sequence captioned.");
}

function handle(fileList) {
  const files = Array.from(fileList).filter(f => f.type === "" || f.type.startsWith("image/"));
  if (!files.length) { setStatus("Those were not images."); return; }
  if ($("#mode").value === "sequence") captionSequence(files); else captionPhotos(files);
}

const drop = $("#drop"), input = $("#files");
input.addEventListener("change", () => { handle(input.files); input.value = ""; });
drop.addEventListener("click", e => { if (e.target !== input && e.target.tagName !== "LABEL") input.click(); });
drop.addEventListener("keydown", e => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, e => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); handle(e.dataTransfer.files); });
window.addEventListener("resize", () => {  // a map drawn for the old layout would no longer fit
  for (const c of document.querySelectorAll(".heat")) { c.classList.remove("on"); c.style.width = c.style.height = "0px"; }
});
$("#clear").addEventListener("click", () => { $("#results").innerHTML = ""; setStatus(""); });
loadModel();
