// The logit-lens viewer: a form that POSTs /lens and draws the answer (grid + curves).
// Plain browser JavaScript, no build step and no network beyond this service.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#2456c7", "#d1495b", "#00798c", "#edae49", "#66a182", "#8d6a9f", "#30343f", "#e17c05"];
const MAX_LINES = 8;

const state = { file: null, previewUrl: null, answer: null };

function apiKey() {
  return $("api-key").value.trim();
}

function headers() {
  const key = apiKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

// Token text made visible: spaces at the ends, newlines and tabs get a glyph, other control
// characters their escape (ESC → \x1b, which every font can draw); empty becomes ∅.
// A target as sent, and the token actually traced where that differs (" Red" → "␣" when the tokenizer
// splits the leading space off: the probability is the space's, not the word's).
function targetName(t) {
  const traced = t.token === undefined || t.token === t.target ? "" : ` → ${display(t.token)}`;
  return display(t.target) + traced;
}

function display(token) {
  if (token === "") return "∅";
  return token
    .replace(/\n/g, "↵")
    .replace(/\t/g, "⇥")
    .replace(/[\u0000-\u001f]/g, (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"))
    .replace(/^ +| +$/g, (m) => "␣".repeat(m.length));
}

// White → blue as the probability goes 0 → 1.
function probColor(p) {
  const t = Math.max(0, Math.min(1, p));
  const light = 97 - 62 * Math.sqrt(t);
  return `hsl(221, 70%, ${light}%)`;
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(text) {
  const el = $("error");
  el.textContent = text;
  el.hidden = !text;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return `${resp.status} ${body.error.code}: ${body.error.message}`;
  } catch (_) {
    // not JSON
  }
  return `${resp.status} ${resp.statusText}`;
}

async function loadModels() {
  const select = $("model");
  let resp;
  try {
    resp = await fetch("/models", { headers: headers() });
  } catch (e) {
    showError("cannot reach the service: " + e.message);
    return;
  }
  if (resp.status === 401) {
    showError("this service needs an API key: enter it under Options");
    return;
  }
  if (resp.status === 503) {
    setStatus("the models are still loading…");
    setTimeout(loadModels, 2000);
    return;
  }
  if (!resp.ok) {
    showError("GET /models: " + (await errorText(resp)));
    return;
  }
  const list = await resp.json();
  const previous = select.value;
  select.replaceChildren();
  for (const m of list.models) {
    const opt = document.createElement("option");
    opt.value = m.name;
    opt.textContent = `${m.name} (${m.family}, ${m.layers} layers, ${size(m.parameters)} parameters, ${m.dtype} on ${m.device})`;
    select.append(opt);
  }
  if (previous && list.models.some((m) => m.name === previous)) select.value = previous;
  showError("");
  setStatus(`${list.models.length} model(s) ready`);
  document.body.dataset.models = "loaded";
}

function size(n) {
  for (const [d, unit] of [[1e9, "B"], [1e6, "M"], [1e3, "k"]]) {
    if (n >= d) return (n / d).toPrecision(3) + unit;
  }
  return String(n);
}

function chooseFile(file) {
  // The URL stays alive while the image map shows it.
  if (state.previewUrl && state.previewUrl !== state.heatUrl) URL.revokeObjectURL(state.previewUrl);
  state.file = file;
  state.previewUrl = file ? URL.createObjectURL(file) : null;
  const img = $("preview");
  img.hidden = !file;
  $("clear-image").hidden = !file;
  $("drop-hint").hidden = !!file;
  if (file) img.src = state.previewUrl;
  else img.removeAttribute("src");
}

function options() {
  const opts = {
    top_k: Number($("top-k").value) || 5,
    layers: "all",
    summary: true,
    exclude_special: $("exclude-special").checked,
    chat_template: $("chat-template").checked,
  };
  const pos = $("positions").value;
  if (pos === "custom") {
    const text = $("positions-custom").value.trim();
    opts.positions = text.split(",").filter((s) => s.trim() !== "").map((s) => Number(s.trim()));
    if (opts.positions.length === 0 || opts.positions.some((n) => !Number.isInteger(n))) {
      throw new Error("positions: write comma-separated integers, e.g. -3,-2,-1");
    }
  } else {
    opts.positions = pos;
  }
  const targets = $("targets").value;
  if (targets.trim() !== "") opts.targets = targets.split(",").filter((t) => t !== "");
  const generate = Number($("generate").value) || 0;
  if (!Number.isInteger(generate) || generate < 0 || generate > 64) {
    throw new Error("answer: between 0 and 64 tokens");
  }
  if (generate > 0) opts.generate = generate;
  return opts;
}

// The token at a position of the lens: an input token, or past the input the answer's token that
// was fed back there (generated position S + i holds answer token i).
function tokenAt(answer, pos) {
  const n = answer.input.num_tokens;
  if (pos < n) return answer.input.tokens[pos];
  const t = answer.answer && answer.answer.tokens[pos - n];
  return t ? { position: pos, id: t.id, text: t.text, kind: "answer" } : { position: pos, text: "?", kind: "answer" };
}

async function submit(event) {
  event.preventDefault();
  showError("");
  const prompt = $("prompt").value;
  if (prompt.trim() === "") {
    showError("write a prompt first");
    return;
  }
  let opts;
  try {
    opts = options();
  } catch (e) {
    showError(e.message);
    return;
  }
  const form = new FormData();
  form.append("prompt", prompt);
  form.append("model", $("model").value);
  form.append("options", JSON.stringify(opts));
  if (state.file) form.append("image", state.file, state.file.name);
  const sentUrl = state.file ? state.previewUrl : null;
  const button = $("submit");
  button.disabled = true;
  setStatus("running…");
  document.body.dataset.state = "running";
  const started = performance.now();
  try {
    const resp = await fetch("/lens", { method: "POST", body: form, headers: headers() });
    if (!resp.ok) {
      showError(await errorText(resp));
      setStatus("");
      document.body.dataset.state = "error";
      return;
    }
    const answer = await resp.json();
    state.answer = answer;
    render(answer, sentUrl);
    const ms = performance.now() - started;
    setStatus(`done in ${ms.toFixed(0)} ms (model ${answer.timing_ms.total.toFixed(0)} ms)`);
    document.body.dataset.state = "done";
  } catch (e) {
    showError("the request failed: " + e.message);
    setStatus("");
    document.body.dataset.state = "error";
  } finally {
    button.disabled = false;
  }
}

function render(answer, imageUrl) {
  $("results").hidden = false;
  const t = answer.input;
  $("summary-line").textContent =
    `${answer.model} (${answer.family}), ${answer.num_layers} layers; ${t.num_tokens} input tokens` +
    (t.num_image_tokens ? `, ${t.num_image_tokens} of them image tokens` : "") +
    (answer.excluded_ids ? `; ${answer.excluded_ids.length} excluded id range(s)` : "") +
    (answer.answer
      ? `; answer (${answer.answer.tokens.length} tokens, ${answer.answer.stopped}): ${JSON.stringify(answer.answer.text)}`
      : "");
  renderGrid(answer);
  renderHeat(answer, imageUrl);
  renderCharts(answer);
  const link = $("download");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([JSON.stringify(answer, null, 2)], { type: "application/json" }));
}

function renderGrid(answer) {
  const table = $("grid");
  table.replaceChildren();
  const positions = answer.layers.length ? answer.layers[0].positions.map((p) => p.position) : [];
  const thead = table.createTHead();
  const head = thead.insertRow();
  const corner = document.createElement("th");
  corner.textContent = "layer \\ input";
  head.append(corner);
  for (const pos of positions) {
    const th = document.createElement("th");
    const tok = tokenAt(answer, pos);
    th.textContent = display(tok.text);
    if (tok.kind === "image") th.className = "image-token";
    if (tok.kind === "answer") {
      th.className = "answer-token";
      th.title = "a token of the model's answer, fed back here";
      th.dataset.id = tok.id;
    }
    const small = document.createElement("span");
    small.className = "pos";
    small.textContent = `#${pos}`;
    th.append(small);
    th.dataset.position = pos;
    head.append(th);
  }
  const body = table.createTBody();
  const layers = $("final-on-top").checked ? [...answer.layers].reverse() : answer.layers;
  for (const layer of layers) {
    const row = body.insertRow();
    row.dataset.layer = layer.layer;
    const th = document.createElement("th");
    th.textContent = layer.layer === 0 ? "0 (emb)" : String(layer.layer);
    row.append(th);
    for (const p of layer.positions) {
      const td = row.insertCell();
      const top = p.top[0];
      td.textContent = display(top.token);
      td.dataset.token = top.token;
      td.dataset.prob = top.prob;
      td.dataset.position = p.position;
      if (p.position >= answer.input.num_tokens) td.classList.add("answer-cell");
      td.style.background = probColor(top.prob);
      td.style.color = top.prob > 0.55 ? "#fff" : "";
      td.addEventListener("mouseenter", (e) => showTooltip(e, layer, p));
      td.addEventListener("mousemove", moveTooltip);
      td.addEventListener("mouseleave", hideTooltip);
    }
  }
}

// The image tokens as the model sees them: a rows × cols grid over the image (LLaVA-1.5 sees the
// centre crop, OneVision's base tile and Qwen2-VL see the whole image), each patch coloured by the
// top-1 probability or a target's probability at the chosen layer.
function renderHeat(answer, imageUrl) {
  const grid = answer.input.image_grid;
  const section = $("heat");
  const byPos = new Map(answer.layers.length ? answer.layers[0].positions.map((p, i) => [p.position, i]) : []);
  const cells = grid ? grid.rows * grid.cols : 0;
  let shown = 0;
  for (let i = 0; i < cells; i++) if (byPos.has(grid.first_position + i)) shown++;
  section.hidden = !(grid && imageUrl && shown > 0);
  section.dataset.cells = section.hidden ? 0 : shown;
  if (section.hidden) return;
  const img = $("heat-image");
  if (state.heatUrl && state.heatUrl !== imageUrl && state.heatUrl !== state.previewUrl) {
    URL.revokeObjectURL(state.heatUrl);
  }
  state.heatUrl = imageUrl;
  img.src = imageUrl;
  img.style.objectFit = answer.family === "llava" ? "cover" : "fill";
  const box = $("heat-box");
  box.style.aspectRatio = `${grid.cols} / ${grid.rows}`;
  const g = $("heat-grid");
  g.style.gridTemplateColumns = `repeat(${grid.cols}, 1fr)`;
  g.style.gridTemplateRows = `repeat(${grid.rows}, 1fr)`;
  const by = $("heat-by");
  by.replaceChildren();
  const first = answer.layers[0].positions[0];
  const choices = [["top1", "the top-1 probability"]].concat(
    (first.targets || []).map((t, i) => ["target:" + i, `P(${targetName(t)})`]),
  );
  for (const [value, label] of choices) {
    const opt = document.createElement("option");
    opt.value = value;
    opt.textContent = label;
    by.append(opt);
  }
  const slider = $("heat-layer");
  slider.max = answer.layers.length - 1;
  slider.value = answer.layers.length - 1;
  const draw = () => {
    const layer = answer.layers[Number(slider.value)];
    $("heat-layer-out").textContent = String(layer.layer);
    const mode = by.value;
    const probOf = (p) => (mode === "top1" ? p.top[0].prob : p.targets[Number(mode.slice(7))].prob);
    let top = 1;
    if ($("heat-scale").value === "relative") {
      top = 0;
      for (let i = 0; i < cells; i++) {
        const j = byPos.get(grid.first_position + i);
        if (j !== undefined) top = Math.max(top, probOf(layer.positions[j]));
      }
      top = top > 0 ? top : 1;
    }
    g.dataset.top = top;
    g.replaceChildren();
    for (let i = 0; i < cells; i++) {
      const div = document.createElement("div");
      const j = byPos.get(grid.first_position + i);
      if (j === undefined) {
        div.className = "missing";
      } else {
        const p = layer.positions[j];
        const prob = probOf(p);
        div.style.background = `rgba(36, 86, 199, ${(0.85 * Math.sqrt(prob / top)).toFixed(3)})`;
        div.dataset.prob = prob;
        if (grid.cols <= 32) div.textContent = display(p.top[0].token);
        div.addEventListener("mouseenter", (e) => showTooltip(e, layer, p));
        div.addEventListener("mousemove", moveTooltip);
        div.addEventListener("mouseleave", hideTooltip);
      }
      g.append(div);
    }
  };
  slider.oninput = draw;
  by.onchange = draw;
  $("heat-scale").onchange = draw;
  draw();
}

function showTooltip(event, layer, p) {
  const tip = $("tooltip");
  tip.replaceChildren();
  const head = document.createElement("div");
  head.className = "head";
  head.textContent = `layer ${layer.layer}, position ${p.position}: entropy ${p.entropy.toFixed(3)} nats, KL to final ${p.kl_to_final.toFixed(3)}`;
  tip.append(head);
  const table = document.createElement("table");
  for (const t of p.top) {
    const r = table.insertRow();
    r.insertCell().textContent = (100 * t.prob).toFixed(2) + "%";
    r.insertCell().textContent = display(t.token);
    r.insertCell().textContent = `id ${t.id}`;
  }
  for (const t of p.targets || []) {
    const r = table.insertRow();
    r.insertCell().textContent = (100 * t.prob).toFixed(2) + "%";
    r.insertCell().textContent = targetName(t);
    r.insertCell().textContent = `target, rank ${t.rank}`;
  }
  tip.append(table);
  tip.hidden = false;
  moveTooltip(event);
}

function moveTooltip(event) {
  const tip = $("tooltip");
  const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  const y = Math.min(event.clientY + 14, window.innerHeight - tip.offsetHeight - 8);
  tip.style.left = x + "px";
  tip.style.top = y + "px";
}

function hideTooltip() {
  $("tooltip").hidden = true;
}

function renderCharts(answer) {
  const layers = answer.layers.map((l) => l.layer);
  const positions = answer.layers.length ? answer.layers[0].positions.map((p) => p.position) : [];
  // The last chosen positions are the interesting ones (where the answer is read).
  const shown = positions.slice(-MAX_LINES);
  const posName = (pos) => `#${pos} ${display(tokenAt(answer, pos).text)}`;
  const byPosition = (field) =>
    shown.map((pos, i) => ({
      name: posName(pos),
      values: answer.layers.map((l) => l.positions.find((p) => p.position === pos)[field]),
      color: COLORS[i % COLORS.length],
    }));
  const conf = answer.layers.every((l) => l.mean_max_prob != null)
    ? [{ name: "mean max prob, all positions", values: answer.layers.map((l) => l.mean_max_prob), color: COLORS[0] }]
    : [];
  const lastPos = positions[positions.length - 1];
  if (lastPos !== undefined) {
    conf.push({
      name: `max prob at ${posName(lastPos)}`,
      values: answer.layers.map((l) => l.positions.find((p) => p.position === lastPos).top[0].prob),
      color: COLORS[1],
    });
  }
  lineChart($("chart-confidence"), "Confidence per layer", layers, conf, { yMin: 0, yMax: 1 });
  lineChart($("chart-entropy"), "Entropy per layer (nats)", layers, byPosition("entropy"), { yMin: 0 });
  lineChart($("chart-kl"), "KL to the final layer (nats)", layers, byPosition("kl_to_final"), { yMin: 0 });
  const targets = [];
  if (lastPos !== undefined) {
    const first = answer.layers[0].positions.find((p) => p.position === lastPos);
    (first.targets || []).forEach((t, i) => {
      targets.push({
        name: `${targetName(t)} (id ${t.id})`,
        values: answer.layers.map((l) => l.positions.find((p) => p.position === lastPos).targets[i].prob),
        color: COLORS[i % COLORS.length],
      });
    });
  }
  const answerFigure = $("chart-answer");
  answerFigure.hidden = !answer.answer;
  if (answer.answer) {
    const series = answer.answer.tokens.slice(0, MAX_LINES).map((t, i) => ({
      name: `${display(t.text)} (id ${t.id}, emitted at #${t.position})`,
      values: t.probs,
      color: COLORS[i % COLORS.length],
    }));
    lineChart(answerFigure, "Probability of each emitted token by layer", layers, series, { yMin: 0, yMax: 1 });
  }
  lineChart($("chart-targets"), `Target probabilities at ${lastPos === undefined ? "-" : posName(lastPos)}`, layers, targets, {
    yMin: 0,
    empty: "add targets under Options to trace tokens through the layers",
  });
}

const SVG = "http://www.w3.org/2000/svg";
function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.append(e);
  return e;
}

function niceTicks(lo, hi, n) {
  const span = hi - lo || 1;
  const step0 = span / n;
  const mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= step0);
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) ticks.push(+v.toFixed(10));
  return ticks;
}

function tickLabel(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a < 1e-3 || a >= 1e5 ? v.toExponential(1) : String(+v.toPrecision(4));
}

// A small SVG line chart: x = layer, one polyline per series, a legend, hover titles.
function lineChart(figure, title, xs, series, opts) {
  figure.replaceChildren();
  const cap = document.createElement("figcaption");
  cap.textContent = title;
  figure.append(cap);
  figure.dataset.series = series.length;
  if (series.length === 0) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = opts.empty || "nothing to draw";
    figure.append(p);
    return;
  }
  const W = 440, H = 220, m = { l: 44, r: 10, t: 8, b: 30 };
  const all = series.flatMap((s) => s.values).filter((v) => Number.isFinite(v));
  const yMin = opts.yMin ?? Math.min(...all);
  let yMax = opts.yMax ?? Math.max(...all);
  if (yMax <= yMin) yMax = yMin + 1;
  const xMin = xs[0], xMax = xs[xs.length - 1] === xs[0] ? xs[0] + 1 : xs[xs.length - 1];
  const X = (x) => m.l + ((x - xMin) / (xMax - xMin)) * (W - m.l - m.r);
  const Y = (y) => H - m.b - ((y - yMin) / (yMax - yMin)) * (H - m.t - m.b);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title }, figure);
  const grid = el("g", { class: "grid" }, svg);
  const axis = el("g", { class: "axis" }, svg);
  for (const t of niceTicks(yMin, yMax, 5)) {
    el("line", { x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t) }, grid);
    const label = el("text", { x: m.l - 5, y: Y(t) + 4, "text-anchor": "end" }, axis);
    label.textContent = tickLabel(t);
  }
  for (const t of niceTicks(xMin, xMax, Math.min(10, xs.length)).filter(Number.isInteger)) {
    el("line", { x1: X(t), x2: X(t), y1: H - m.b, y2: H - m.b + 4 }, axis);
    const label = el("text", { x: X(t), y: H - m.b + 15, "text-anchor": "middle" }, axis);
    label.textContent = String(t);
  }
  el("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }, axis);
  el("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b }, axis);
  const xl = el("text", { x: (W + m.l) / 2, y: H - 2, "text-anchor": "middle" }, axis);
  xl.textContent = "layer";
  for (const s of series) {
    const pts = xs.map((x, i) => [x, s.values[i]]).filter(([, y]) => Number.isFinite(y));
    el("polyline", {
      points: pts.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" "),
      fill: "none",
      stroke: s.color,
      "stroke-width": 2,
    }, svg);
    for (const [x, y] of pts) {
      const dot = el("circle", { cx: X(x), cy: Y(y), r: 2.6, fill: s.color }, svg);
      el("title", {}, dot).textContent = `${s.name}: layer ${x}, ${y.toPrecision(4)}`;
    }
  }
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const s of series) {
    const item = document.createElement("span");
    item.style.setProperty("--c", s.color);
    item.textContent = s.name;
    legend.append(item);
  }
  figure.append(legend);
}

function setupDrop() {
  const drop = $("drop");
  const input = $("image");
  input.addEventListener("change", () => chooseFile(input.files[0] || null));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) chooseFile(file);
  });
  $("clear-image").addEventListener("click", () => {
    input.value = "";
    chooseFile(null);
  });
}

function init() {
  setupDrop();
  $("lens-form").addEventListener("submit", submit);
  $("final-on-top").addEventListener("change", () => {
    if (state.answer) renderGrid(state.answer);
  });
  $("positions").addEventListener("change", () => {
    $("positions-custom").hidden = $("positions").value !== "custom";
  });
  const key = sessionStorage.getItem("logit-lens-key");
  if (key) $("api-key").value = key;
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("logit-lens-key", apiKey());
    loadModels();
  });
  loadModels();
}

window.logitLens = { display };
document.addEventListener("DOMContentLoaded", init);
