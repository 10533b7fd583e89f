// The service's own page: an image (file, drop, paste, example) or webcam frames go to
// POST /predict; every face comes back boxed, with its eight probabilities as bars.
// Plain JavaScript, no build step, nothing from another host; the CSP allows no inline code.
"use strict";

const $ = (id) => document.getElementById(id);
const FRAME_WIDTH = 320; // webcam frames are scaled to this width before they are sent
const FRAME_TIMEOUT_MS = 10000; // a webcam frame not answered by then is given up
const BUSY_TRIES = 3; // an upload refused as overloaded is sent again this many times
const MIN_SHOWN = { width: 320, height: 480 }; // a smaller image is shown larger, its tags legible
// generation: bumped by every new file and every webcam start or stop, so a reply to an
// earlier one (a slow file, a frame in flight) is dropped instead of drawn over a newer one.
// controller: aborts the request in flight when a newer one replaces it, which frees its
// place at the service rather than letting it run to an answer nobody reads.
const state = { classes: [], models: [], examples: [], nextExample: 0, objectUrl: null,
                stream: null, running: false, starting: false, sent: [], generation: 0,
                controller: null, initDelay: 1000, last: null, shown: null, focusedFace: 0,
                interval: null, listHeld: false, noteUntil: 0 }; // interval: takeInterval's, from its field
const NOTE_MS = 5000; // a message about a drop or paste stays this long while webcam frames come

function newRequestSignal() {
  if (state.controller) state.controller.abort();
  state.controller = new AbortController();
  return state.controller.signal;
}

// What an answer without a JSON detail (a proxy's, or the service's gone) says in words:
// HTTP/2 has no reason phrase, so a bare "413 " or "502 " was all the page showed.
const STATUS_WORDS = {
  400: "the request was refused as malformed", 404: "not found on this server",
  408: "the request took too long to arrive", 413: "the request is larger than the server, or a proxy in front of it, takes",
  429: "too many requests at once; try again shortly", 500: "the server failed on this request",
  502: "the service behind the proxy is not answering", 503: "the service is busy or not ready; try again shortly",
  504: "the service behind the proxy did not answer in time" };

function statusInWords(response) {
  const words = STATUS_WORDS[response.status] || response.statusText || "the server refused the request";
  return `${words} (HTTP ${response.status})`;
}

function eitherSignal(signals) {
  if (signals.length < 2) return signals[0];
  if (AbortSignal.any) return AbortSignal.any(signals);
  // AbortSignal.any is recent (Safari 17.4, Firefox 124): without it the timeout was dropped
  const either = new AbortController();
  for (const signal of signals) signal.addEventListener("abort", () => either.abort(signal.reason), { once: true });
  return either.signal;
}

async function api(path, options = {}, timeoutMs = 0) {
  let response;
  const timeout = timeoutMs ? AbortSignal.timeout(timeoutMs) : null;
  try {
    response = await fetch(path, { ...options, signal: eitherSignal([options.signal, timeout].filter(Boolean)) });
  } catch (err) {
    // which signal fired, not the error's name: browsers name an abort by a reason differently
    if (options.signal && options.signal.aborted) return { ok: false, status: 0, aborted: true, detail: "replaced" };
    const why = timeout && timeout.aborted ? `no answer in ${timeoutMs / 1000} s` : err.message;
    return { ok: false, status: 0, detail: `the server could not be reached (${why})` };
  }
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON (or cut off): say the status */ }
  if (response.ok && body === null) {
    return { ok: false, status: response.status, detail: `the answer (${response.status}) could not be read` };
  }
  if (!response.ok) {
    const detail = (body && (body.detail || body.error)) || statusInWords(response);
    // seconds; a proxy's negative value sent the retries at once
    const retryAfter = Math.max(0, Number(response.headers.get("Retry-After"))) || 0;
    return { ok: false, status: response.status, detail, code: body && body.code, retryAfter };
  }
  return { ok: true, status: response.status, body };
}

function showError(message) {
  const box = $("error");
  if (!box.hidden && box.textContent === message) return; // the alert speaks once, not per frame
  box.textContent = message;
  box.hidden = false;
}

function showKept(message) {
  // shown as an error, but kept: the webcam's next good frame cleared it in 150 ms
  showError(message);
  state.noteUntil = performance.now() + NOTE_MS;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function percent(value) {
  // One decimal, and never "100%" for what is not certain (0.996 would round up to it).
  return `${Math.min(100 * value, value < 1 ? 99.9 : 100).toFixed(1)}%`;
}

function describeModel() {
  const entry = state.models.find((m) => m.name === $("model").value);
  if (!entry) {  // every model unloaded: "Loading the models…" stayed for good
    $("model-info").textContent = "No model is loaded on this server; /readyz says why.";
    $("model-info").removeAttribute("title");
    return;
  }
  const scores = Object.entries(entry.test_macro_f1 || {})
    .map(([set, value]) => `${set.replace("fer2013", "FER-2013").replace("identity", "identity test")} ${value.toFixed(3)}`)
    .join(", ");
  $("model-info").textContent = `${entry.name}: sha256 ${entry.sha256.slice(0, 16)}…, test macro-F1 ${scores}`;
  $("model-info").title = entry.sha256;
}

async function init() {
  const [classes, models, examples] = await Promise.all([api("/classes"), api("/models"), api("/examples")]);
  if (!classes.ok || !models.ok) {
    // tried again, more slowly each time: a page that gave up stayed broken until reloaded
    const seconds = state.initDelay / 1000;
    showError(`The service did not answer: ${(classes.ok ? models : classes).detail}; trying again in ${seconds} s.`);
    setTimeout(init, state.initDelay);
    state.initDelay = Math.min(2 * state.initDelay, 30000);
    return;
  }
  clearError();
  state.classes = classes.body.map((c) => c.name);
  state.models = models.body;
  const select = $("model");
  for (const entry of state.models) {
    const option = new Option(entry.loaded ? entry.name : `${entry.name} (unavailable)`, entry.name);
    option.disabled = !entry.loaded;
    // the operator's EMOTION_DEFAULT_MODEL, not the manifest's first, as /predict without model=
    option.selected = entry.default && entry.loaded;
    select.add(option);
  }
  describeModel();
  if (examples.ok && examples.body.length) {
    state.examples = examples.body;
    $("example").hidden = false;
  }
  document.body.dataset.ready = "true";
}

function pageReady() {
  // Before init has the classes and models, an answer could not be drawn (no bars).
  if (document.body.dataset.ready === "true") return true;
  showError("The page is still waiting for the service; try again in a moment.");
  return false;
}

function query() {
  // An empty choice (no model loaded) is left out: the service then says why none answers,
  // where model= was refused as an unknown model ''.
  const params = new URLSearchParams();
  for (const name of ["model", "faces"]) {
    if ($(name).value) params.set(name, $(name).value);
  }
  return params.toString();
}

function previewable(blob, name) {
  // Chromium and Firefox show no HEIC/HEIF; the service reads them all the same.
  return !/hei[cf]/i.test(blob.type) && !/\.(heic|heif)$/i.test(name || "");
}

async function animated(blob) {
  // From the bytes, not the name: a GIF, an APNG (acTL before the pixels) or an animated
  // WebP (VP8X with its animation flag), whatever the file is called.
  const head = new Uint8Array(await blob.slice(0, 65536).arrayBuffer());
  const text = new TextDecoder("latin1").decode(head); // one character per byte
  if (text.startsWith("GIF8")) return true;
  if (text.startsWith("RIFF") && text.slice(8, 12) === "WEBP") return text.slice(12, 16) === "VP8X" && (head[20] & 0x02) !== 0;
  if (head[0] === 0x89 && text.slice(1, 4) === "PNG") {
    const actl = text.indexOf("acTL");
    const idat = text.indexOf("IDAT");
    return actl >= 0 && (idat < 0 || actl < idat);
  }
  return false;
}

const MAX_WALKED = 64 * 1024 * 1024; // a WebP larger is shown as the browser shows it

async function webpOrientation(blob) {
  // A WebP's EXIF orientation, which the service applies and Chromium ignores: 1 where none.
  // Read as the service reads it, and Chromium a JPEG's: the first IFD's tag 0x0112 as one
  // SHORT, in a TIFF whose byte order and magic number are right.
  const head = new DataView(await blob.slice(0, 21).arrayBuffer());
  const fourcc = (view, at) => String.fromCharCode(...[0, 1, 2, 3].map((i) => view.getUint8(at + i)));
  if (head.byteLength < 21 || fourcc(head, 0) !== "RIFF" || fourcc(head, 8) !== "WEBP"
      || fourcc(head, 12) !== "VP8X" || !(head.getUint8(20) & 0x08)) return 1; // no EXIF flag
  if (blob.size > MAX_WALKED) return 1;
  // the EXIF chunk follows the pixels (an animation's every frame): the file is read once
  // and walked in memory (a read per chunk took 98 s for 100,000 chunks)
  const file = new DataView(await blob.arrayBuffer());
  const end = Math.min(file.byteLength, 8 + file.getUint32(4, true)); // libwebp stops there
  for (let at = 12; at + 8 <= end;) {
    const size = file.getUint32(at + 4, true);
    if (fourcc(file, at) === "EXIF") {
      let start = at + 8;
      const prefixed = size >= 6 && fourcc(file, start) === "Exif" && file.getUint16(start + 4) === 0;
      if (prefixed) start += 6;
      const tiff = new DataView(file.buffer, start, Math.min(at + 8 + size, file.byteLength) - start);
      const order = tiff.getUint16(0);
      if (order !== 0x4949 && order !== 0x4d4d) return 1; // "II" or "MM"
      const little = order === 0x4949;
      if (tiff.getUint16(2, little) !== 42) return 1;
      const first = tiff.getUint32(4, little);
      const entries = tiff.getUint16(first, little);
      for (let i = 0; i < entries; i += 1) {
        const entry = first + 2 + 12 * i;
        if (tiff.getUint16(entry, little) !== 0x0112 || tiff.getUint16(entry + 2, little) !== 3
            || tiff.getUint32(entry + 4, little) !== 1) continue; // as Chromium: on to the next
        const value = tiff.getUint16(entry + 8, little);
        if (value >= 1 && value <= 8) return value;
      }
      return 1;
    }
    at += 8 + size + (size % 2); // chunks are padded to an even size
  }
  return 1;
}

// The canvas transform that turns stored pixels upright, per EXIF orientation (2 to 8).
const UPRIGHT = { 2: [-1, 0, 0, 1, 1, 0], 3: [-1, 0, 0, -1, 1, 1], 4: [1, 0, 0, -1, 0, 1],
                  5: [0, 1, 1, 0, 0, 0], 6: [0, 1, -1, 0, 1, 0], 7: [0, -1, -1, 0, 1, 1],
                  8: [0, -1, 1, 0, 0, 1] };

async function shownAsClassified(blob) {
  // The image as the service classifies it, for the boxes to sit on its faces: an
  // animation's first frame, still (it played in <img>), and a WebP turned upright by its
  // EXIF orientation, which Chromium ignores (the service applies it, as Safari does).
  if (!window.createImageBitmap) return blob;
  try {
    const orientation = await webpOrientation(blob).catch(() => 1);
    const turn = UPRIGHT[orientation];
    if (!turn && !(await animated(blob))) return blob;
    // the stored pixels, turned here: the same in a browser that would turn them itself
    const bitmap = await createImageBitmap(blob, turn ? { imageOrientation: "none" } : {});
    const [width, height] = [bitmap.width, bitmap.height];
    const quarter = orientation >= 5;
    const canvas = document.createElement("canvas");
    canvas.width = quarter ? height : width;
    canvas.height = quarter ? width : height;
    const context = canvas.getContext("2d");
    if (turn) {
      const [a, b, c, d, e, f] = turn; // e, f: in units of the stored width or height
      context.setTransform(a, b, c, d, e * (quarter ? height : width), f * (quarter ? width : height));
    }
    context.drawImage(bitmap, 0, 0);
    bitmap.close();
    return await new Promise((resolve) => canvas.toBlob((still) => resolve(still || blob), "image/png"));
  } catch (_) {
    return blob; // shown as the browser shows it; the service may still read it
  }
}

async function classifyFile(blob, name, note = "") {
  if (!pageReady()) return;
  stopWebcam();
  const generation = state.generation;
  clearError();
  state.focusedFace = 0; // a new image's faces are read from the first
  render([]); // the last image's boxes and faces are not this one's, even while it is sent
  $("status").textContent = `Loading ${name || "the image"}…`; // nor is the last one's summary
  state.last = state.shown = { blob, name }; // shown: kept while an example loads
  try {
    // a dropped folder, or a file moved since it was chosen: fetch said "the server could not
    // be reached" for it, while the server was up
    await blob.slice(0, 1).arrayBuffer();
  } catch (_) {
    if (generation !== state.generation) return;
    $("status").textContent = "";
    $("stage").hidden = true;
    showError(`${name || "The file"} could not be read (a folder, or a file moved or deleted since it was chosen): choose an image file.`);
    return;
  }
  if (generation !== state.generation) return;
  const photo = $("photo");
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = null;
  $("video").hidden = true;
  let size = null;
  if (previewable(blob, name)) {
    const shown = await shownAsClassified(blob);
    if (generation !== state.generation) return;
    state.objectUrl = URL.createObjectURL(shown);
    photo.src = state.objectUrl;
    photo.alt = `The image ${name || "sent"}`;
    photo.hidden = false;
    try {
      await photo.decode();
      size = { width: photo.naturalWidth, height: photo.naturalHeight };
      // a face crop of 96 pixels was shown at that, its face's tag wider than the photo
      const larger = Math.min(MIN_SHOWN.width / size.width, MIN_SHOWN.height / size.height);
      photo.style.width = larger > 1 ? `${Math.round(size.width * larger)}px` : "";
    } catch (_) {
      // A newer image replacing this one also rejects the decode: leave the photo to it.
      if (generation !== state.generation) return;
      photo.hidden = true; // the browser cannot draw it; the service may still read it
    }
    if (generation !== state.generation) return;
  } else {
    photo.hidden = true;
  }
  $("stage").hidden = !size;
  $("status").textContent = `Sending ${name || "the image"}…`;
  const form = new FormData();
  form.append("file", blob, name || "image");
  const started = performance.now();
  const mode = $("faces").value; // as sent: the select may change while the answer comes
  let result = await api(`/predict?${query()}`, { method: "POST", body: form, signal: newRequestSignal() });
  // Busy: sent again after the Retry-After the service gave, a few times, as the webcam
  // does; the message to retry left no way to but choosing the file again
  for (let tries = 1; tries <= BUSY_TRIES && result.code === "overloaded"; tries += 1) {
    if (generation !== state.generation) return;
    const seconds = Math.min(result.retryAfter || 1, 10);
    $("status").textContent = `The service is busy; sending ${name || "the image"} again in ${seconds} s…`;
    await new Promise((resolve) => setTimeout(resolve, 1000 * seconds));
    if (generation !== state.generation) return;
    result = await api(`/predict?${query()}`, { method: "POST", body: form, signal: newRequestSignal() });
  }
  if (generation !== state.generation) return; // another file or the webcam came since
  if (!result.ok) {
    render([], size);
    $("status").textContent = "";
    showError(result.detail);
    return;
  }
  const ms = Math.round(performance.now() - started);
  render(result.body.predictions, size);
  const faces = result.body.predictions.filter((p) => p.face).length;
  // faces=all or auto with no face found falls back to the whole image, as none asks
  const whole = result.body.predictions.length > 0 && faces === 0;
  // faces_found counts every face the detector found; auto classifies one, all up to the
  // server's limit, so the line says when faces in the photo were left out
  const found = Math.max(faces, ...result.body.predictions.map((p) => p.faces_found || 0));
  const model = result.body.model;
  const summary = whole && mode === "none" ? `The whole image classified by ${model}`
    : whole ? `No face found: the whole image classified by ${model}`
    : found > faces && faces === 1 ? `The largest of ${found} faces found, classified by ${model}`
    : found > faces ? `${faces} of ${found} faces found classified by ${model} (the server's limit per photo)`
    : `${faces} face${faces === 1 ? "" : "s"} found by ${model}`;
  $("status").textContent = summary + ` in ${ms} ms` +
    (size ? "" : " (this browser cannot show this image's format)") + note;
  photo.alt = `The image ${name || "sent"}` + (whole ? (mode === "none" ? "" : ", no face found") + ", classified whole" : faces ? `, with ${faces} face${faces === 1 ? "" : "s"} boxed` : "");
}

function render(predictions, size) {
  const boxes = $("boxes");
  const list = $("faces-list");
  boxes.replaceChildren();
  // The list's items are kept and refilled, not rebuilt: the webcam renders a frame every
  // 150 ms, and a rebuilt item took the keyboard's focus with it. A focused face that a
  // frame no longer has passes the focus to the nearest face left, or with none left to the
  // list, which hands it back once faces come (only what render gave it: a click on the
  // list's gaps focuses it too).
  const hadFocus = document.activeElement === list ? state.listHeld
    : list.contains(document.activeElement);
  while (list.children.length > predictions.length) list.lastElementChild.remove();
  $("stage").dataset.faces = String(predictions.length);
  predictions.forEach((p, i) => {
    const item = list.children[i] || faceItem(list, i);
    item.replaceChildren();
    item.removeAttribute("aria-label");
    delete item.dataset.label;
    const title = document.createElement("h2");
    if (p.error) {
      title.textContent = `${p.filename || "Image"}: not classified`;
      const line = document.createElement("p");
      line.className = "error-line";
      line.textContent = p.error;
      item.append(title, line);
      return;
    }
    item.dataset.label = p.label;
    const where = p.face ? `Face ${i + 1}` : "Whole image";
    title.textContent = `${where}: ${p.label} ${percent(p.probabilities[p.label])}`;
    // a face's name, read out when it changes while focused: the webcam's would change with
    // every frame, so there it is only which face; its answer is in its content
    item.setAttribute("aria-label", state.running ? where : `${where}, ${p.label}, ${percent(p.probabilities[p.label])}`);
    const bars = document.createElement("div");
    bars.className = "bars";
    for (const name of state.classes) {
      const value = p.probabilities[name];
      const label = document.createElement("span");
      label.textContent = name;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("role", "meter");
      bar.setAttribute("aria-label", name);
      bar.setAttribute("aria-valuemin", "0");
      bar.setAttribute("aria-valuemax", "1");
      bar.setAttribute("aria-valuenow", value.toFixed(4));
      bar.setAttribute("aria-valuetext", percent(value));
      const fill = document.createElement("i");
      fill.style.width = `${(100 * value).toFixed(2)}%`;
      bar.append(fill);
      const number = document.createElement("span");
      number.className = "value";
      number.textContent = percent(value);
      if (name === p.label) [label, number].forEach((e) => e.classList.add("top"));
      bars.append(label, bar, number);
    }
    item.append(title, bars);
    if (p.face && size) {
      const box = document.createElement("div");
      box.className = "box";
      box.dataset.index = String(i);
      // drawn inside the image: past its edge, the border and the tag were clipped away
      const left = Math.max(0, p.face.x);
      const top = Math.max(0, p.face.y);
      const right = Math.min(size.width, p.face.x + p.face.width);
      const bottom = Math.min(size.height, p.face.y + p.face.height);
      box.style.left = `${(100 * left) / size.width}%`;
      box.style.top = `${(100 * top) / size.height}%`;
      box.style.width = `${(100 * (right - left)) / size.width}%`;
      box.style.height = `${(100 * (bottom - top)) / size.height}%`;
      const tag = document.createElement("span");
      tag.textContent = `${i + 1} ${p.label}`;
      box.append(tag);
      boxes.append(box);
      // a box in the image's right half has its tag end at the box's right edge: from the
      // left edge, a narrow box's tag ran past the image and was cut ("2 SURPR" on a phone)
      tag.classList.toggle("end", left + right > size.width);
      box.addEventListener("mouseenter", relight);
      box.addEventListener("mouseleave", relight);
    }
  });
  if (hadFocus && (!list.contains(document.activeElement) || document.activeElement === list)) {
    const face = list.children[Math.min(state.focusedFace, list.children.length - 1)];
    // no face left: the list holds the focus while the webcam runs; else the drop zone has it
    const holder = face || (state.running ? list : $("drop"));
    holder.focus({ preventScroll: true });
    state.listHeld = holder === list;
  }
  relight(); // a box under a still pointer is a new element each frame: no mouseenter came
}

function faceItem(list, i) {
  const item = document.createElement("li");
  item.className = "face";
  item.tabIndex = 0;
  item.dataset.index = String(i);
  item.addEventListener("mouseenter", relight);
  item.addEventListener("mouseleave", relight);
  item.addEventListener("focus", () => { state.focusedFace = i; relight(); });
  item.addEventListener("blur", relight);
  list.append(item);
  return item;
}

// The face pointed at is lit, else the focused one: so the focused face lights again once the
// pointer leaves, and a Tab under a resting pointer does not take the light from it.
function relight() {
  const lit = document.querySelector("#boxes .box:hover, #faces-list .face:hover")
    || $("faces-list").querySelector(".face:focus");
  for (const element of document.querySelectorAll(".box, .face")) {
    element.classList.toggle("active", element.dataset.index === lit?.dataset.index);
  }
}

// --- webcam -----------------------------------------------------------------------------

async function startWebcam() {
  if (!pageReady()) return;
  clearError();
  state.focusedFace = 0;
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("This browser offers no camera here (a camera needs https or localhost).");
    return;
  }
  // One start at a time: a double click opened two cameras and left one on for good.
  state.starting = true;
  const focused = document.activeElement === $("webcam"); // disabling drops the focus
  $("webcam").disabled = true;
  // a file picked meanwhile wins over the camera (its stopWebcam moves the generation on);
  // not moved here, so a start that fails leaves an upload in flight to land
  const generation = state.generation;
  let stream = null;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    const video = $("video");
    video.srcObject = stream;
    await video.play();
  } catch (err) {
    // the camera must not stay open behind a "Start" button: this stream, not another
    if (stream) stream.getTracks().forEach((track) => track.stop());
    $("video").srcObject = null;
    if (generation === state.generation) {
      showError(`The camera could not be ${stream ? "shown" : "opened"}: ${err.message || err.name}`);
    }
    return;
  } finally {
    state.starting = false;
    $("webcam").disabled = false;
    // a second Enter stops it, by keyboard alone; not if the user has moved on meanwhile
    if (focused && (!document.activeElement || document.activeElement === document.body)) $("webcam").focus();
  }
  if (generation !== state.generation) { // a file was picked while the camera opened
    stream.getTracks().forEach((track) => track.stop());
    $("video").srcObject = null;
    return;
  }
  state.stream = stream;
  const video = $("video");
  $("photo").hidden = true;
  video.hidden = false;
  $("stage").hidden = false;
  // The label says what a press does; no aria-pressed too, which would read "Stop the
  // webcam, pressed".
  $("webcam").textContent = "Stop the webcam";
  $("webcam").classList.add("running");
  state.running = true;
  state.last = state.shown = null; // the camera replaced the image on show: a new choice re-sends no file
  state.sent = [];
  state.generation += 1;
  $("status").setAttribute("aria-live", "off"); // a line per frame is noise to a screen reader
  tick(state.generation);
}

function stopWebcam() {
  const wasRunning = state.running;
  state.running = false;
  state.generation += 1; // a frame still in flight is dropped when it lands
  if (wasRunning && state.controller) state.controller.abort();
  if (state.stream) state.stream.getTracks().forEach((track) => track.stop());
  state.stream = null;
  $("video").hidden = true;
  $("status").setAttribute("aria-live", "polite");
  if (wasRunning) { // the last frame's boxes and faces go with the camera
    render([]);
    $("stage").hidden = true;
    $("status").textContent = "Webcam stopped.";
  }
  $("webcam").textContent = "Start the webcam";
  $("webcam").classList.remove("running");
  delete $("status").dataset.fps;
}

async function tick(generation) {
  if (!state.running || generation !== state.generation) return;
  const started = performance.now();
  const video = $("video");
  const canvas = document.createElement("canvas");
  canvas.width = FRAME_WIDTH;
  canvas.height = Math.round((FRAME_WIDTH * video.videoHeight) / (video.videoWidth || FRAME_WIDTH));
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  const frame = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.85));
  const result = await api(`/predict?${query()}`, {
    method: "POST", headers: { "Content-Type": "image/jpeg" }, body: frame, signal: newRequestSignal() },
  FRAME_TIMEOUT_MS);
  if (!state.running || generation !== state.generation) return;
  const now = performance.now();
  if (result.ok) {
    if (now > state.noteUntil) clearError(); // not a message to the person, still to be read
    render(result.body.predictions, { width: canvas.width, height: canvas.height });
    state.sent = state.sent.filter((t) => now - t < 3000).concat(now); // answered frames only
  } else {
    render([], { width: canvas.width, height: canvas.height }); // no boxes of an old frame
    state.sent = state.sent.filter((t) => now - t < 3000);
    showError(result.detail);
  }
  const fps = state.sent.length > 1 ? (1000 * (state.sent.length - 1)) / (now - state.sent[0]) : 0;
  $("status").textContent = `Webcam: ${fps.toFixed(1)} frames/s, ${canvas.width}x${canvas.height} frames`;
  $("status").dataset.fps = fps.toFixed(2);
  const interval = state.interval;
  // A 503 says when to come back (Retry-After); the webcam waits that long, not the interval.
  // Unreachable: once a second, not every interval.
  const wait = result.ok ? interval - (now - started)
    : Math.max(interval, 1000 * (result.retryAfter || (result.status === 0 ? 1 : 0)));
  setTimeout(() => tick(generation), Math.max(0, wait));
}

// Taken when the field changes, not as it is typed (the note is read out): a value past the
// field's bounds is brought within them, and one that is no number is the default; the note
// says which.
function takeInterval() {
  const field = $("interval");
  const min = Number(field.min), max = Number(field.max), wanted = field.valueAsNumber;
  const given = !field.validity.badInput && field.value !== "" && Number.isFinite(wanted);
  state.interval = given ? Math.min(max, Math.max(min, wanted)) : Number(field.defaultValue);
  $("interval-note").textContent = given && state.interval === wanted ? ""
    : `: ${given ? `${wanted} is not between ${min} and ${max}` : field.validity.badInput ? "not a number" : "none given"}, ${state.interval} used`;
}

function sendFrameNow() {
  state.generation += 1; // the frame waiting for its turn, or in flight, is dropped
  if (state.controller) state.controller.abort();
  tick(state.generation);
}

// --- wiring -----------------------------------------------------------------------------

function pickFile() { $("file").click(); }

function wire() {
  $("model").addEventListener("change", describeModel);
  // The image on show is classified again with the new choice (the webcam's next frame
  // takes it by itself); before, the old answer stayed under the new model's name.
  for (const id of ["model", "faces"]) {
    $(id).addEventListener("change", () => {
      if (state.running) sendFrameNow(); // not after a 503's Retry-After for the old choice
      else if (!state.starting && state.last) classifyFile(state.last.blob, state.last.name);
    });
  }
  $("interval").addEventListener("change", takeInterval);
  takeInterval();
  // a value the browser restores (Back, Forward) comes after this script has run
  window.addEventListener("pageshow", takeInterval);
  // a blur of the whole window leaves the list the active element: it still holds the focus
  $("faces-list").addEventListener("blur", () => {
    if (document.activeElement !== $("faces-list")) state.listHeld = false;
  });
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) classifyFile(file, file.name);
    e.target.value = "";
  });
  const drop = $("drop");
  drop.addEventListener("click", pickFile);
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); pickFile(); }
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  // A file dropped anywhere on the page is taken, not only on the zone: dropped on the photo,
  // nothing happened, and the last answer stayed as if it were the new photo's.
  window.addEventListener("dragover", (e) => e.preventDefault()); // nor navigates away
  window.addEventListener("drop", (e) => {
    const files = e.dataTransfer.files;
    // text dropped into a field is the field's, as a paste is
    if (!files.length && e.target.closest("input, textarea, select, [contenteditable]")) return;
    e.preventDefault();
    drop.classList.remove("over");
    const note = files.length > 1 ? ` (only the first of the ${files.length} files dropped; drop one at a time)` : "";
    if (files[0]) classifyFile(files[0], files[0].name, note);
    else showKept("Nothing to classify was dropped: drop an image file.");
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    const note = files.length > 1 ? ` (only the first of the ${files.length} files pasted; paste one at a time)` : "";
    if (files[0]) classifyFile(files[0], files[0].name || "pasted image", note);
    // text pasted into a field is the field's; pasted elsewhere, it was taken in silence
    else if (!e.target.closest("input, textarea, select, [contenteditable]")) {
      showKept("Nothing to classify was pasted: copy the image itself (not its name or address) and paste it here.");
    }
  });
  $("example").addEventListener("click", async () => {
    const name = state.examples[state.nextExample % state.examples.length];
    state.nextExample += 1;
    stopWebcam();
    const generation = ++state.generation; // a later click or file picked while this loads wins
    state.last = null; // a new choice while it loads must not send the photo it replaces
    if (state.controller) state.controller.abort(); // an upload's answer would be dropped now
    clearError();
    $("status").textContent = `Loading the example ${name}…`;
    const failed = (detail) => {
      if (generation !== state.generation) return; // not over a newer example's result
      // The photo on show stays, so a new choice classifies it again, not nothing; from
      // state.shown, since an earlier click still loading had cleared state.last too.
      state.last = state.shown;
      $("status").textContent = "";
      showError(`The example ${name} could not be loaded: ${detail}`);
    };
    let blob;
    try {
      const response = await fetch(`/examples/${encodeURIComponent(name)}`);
      if (!response.ok) {
        let detail = `${response.status} ${response.statusText}`;
        try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
        failed(detail);
        return;
      }
      blob = await response.blob(); // the connection may drop mid-body too
    } catch (err) {
      failed(`the server could not be reached (${err.message}).`);
      return;
    }
    if (generation === state.generation) classifyFile(blob, name);
  });
  $("webcam").addEventListener("click", () => {
    if (state.starting) return;
    if (state.running) stopWebcam(); else startWebcam();
  });
  // A hidden tab sends no frames: the camera stops, and the user starts it again.
  document.addEventListener("visibilitychange", () => { if (document.hidden && state.running) stopWebcam(); });
}

document.documentElement.classList.remove("no-js");
for (const element of document.querySelectorAll(".js-needed")) element.hidden = true; // without its CSS too
wire();
init();
