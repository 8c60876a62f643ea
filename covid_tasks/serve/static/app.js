// The page of the inference service: plain JavaScript, no library, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;

function pct(p) { return (100 * p).toFixed(1) + "%"; }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function detail(response) {
  try { return (await response.json()).detail || response.statusText; } catch (e) { return response.statusText; }
}

async function loadModel() {
  const response = await fetch("/v1/model");
  if (!response.ok) {
    $("model-status").textContent = "No model is being served: " + await detail(response);
    $("model-details").hidden = true;
    return;
  }
  model = await response.json();
  $("model-status").textContent = model.status;
  $("model-name").textContent = model.name;
  $("model-version").textContent = model.version;
  $("model-alias").textContent = model.alias;
  $("model-threshold").textContent = model.threshold.toFixed(3);
  $("model-calibrated").textContent = model.calibrated ? "yes" : "no (a score; read it against the threshold)";
  const gate = model.gate || {};
  $("model-gate").textContent = (gate.sensitivity || "?") + " / " + (gate.specificity || "?") +
    (gate.n_test ? " on " + gate.n_test + " test images" : "");
  $("model-trained").textContent = model.trained_at ? model.trained_at.replace("T", " ").slice(0, 16) + " UTC" : "unknown";
  const data = model.training_data || {};
  $("model-training").textContent = trainingText(data);
  $("model-demo").textContent = data.demo ? "Demo model: " + (data.demo_reason || "trained on the sample data") +
    ". Do not read anything into its answers." : "";
  $("model-demo").hidden = !data.demo;
  $("model-details").hidden = false;
}

// "101 images (train 70: 35 covid, val 15: 8 covid, test 16: 8 covid); dataset 1a2b3c4d5e6f; source sample_data"
function trainingText(data) {
  const parts = [];
  const splits = data.splits || {};
  const names = Object.keys(splits);
  if (names.length) {
    const each = names.map((n) => n + " " + splits[n].images + ": " + splits[n].covid + " covid").join(", ");
    parts.push(data.images + " images (" + each + ")");
  }
  if (data.dataset_version) parts.push("dataset " + String(data.dataset_version).slice(0, 12));
  if (data.source) parts.push("source " + data.source);
  return parts.length ? parts.join("; ") : "unknown (registered without a record of its data)";
}

function showResult(file, answer) {
  const item = answer.predictions[0];
  $("result-class").textContent = item.class;
  $("result-class").className = "class-badge " + item.class;
  $("result-prob").textContent = "P(covid) " + pct(item.prob_covid);
  $("result-relation").textContent = item.prob_covid >= item.threshold ? "\u2265" : "<";
  $("result-threshold").textContent = pct(item.threshold);
  $("prob-fill").style.width = pct(item.prob_covid);
  $("threshold-mark").style.left = "calc(" + pct(item.threshold) + " - 1px)";
  $("result-model").textContent = item.model_name;
  $("result-version").textContent = item.model_version;
  $("result-run").textContent = item.run_id || "?";
  $("result-latency").textContent = answer.latency_ms.toFixed(0);
  $("result-file").textContent = file.name;
  // a DICOM film comes back windowed (image_png): the browser cannot draw the file itself
  $("xray").src = item.image_png ? "data:image/png;base64," + item.image_png : URL.createObjectURL(file);
  const heat = $("heatmap");
  if (item.heatmap_png) {
    heat.src = "data:image/png;base64," + item.heatmap_png;
    heat.hidden = !$("show-heatmap").checked;
  } else {
    heat.removeAttribute("src");
    heat.hidden = true;
  }
  $("result").hidden = false;
}

async function classify(file) {
  showError("");
  $("result").hidden = true;
  $("busy").hidden = false;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await fetch("/v1/predict?explain=true", { method: "POST", body: form });
    if (!response.ok) {
      showError("The service refused the image (" + response.status + "): " + await detail(response));
      return;
    }
    showResult(file, await response.json());
    if (!model || model.version !== $("result-version").textContent) { loadModel(); loadPanels(); }
  } catch (e) {
    showError("The service cannot be reached: " + e);
  } finally {
    $("busy").hidden = true;
  }
}

// A small Markdown renderer for the model card: headings, paragraphs, lists, quotes, tables, **bold**
// and `code`. It builds elements and sets textContent only: nothing in the card becomes HTML.
function inline(text, parent) {
  let buf = "";
  const flush = () => { if (buf) { parent.appendChild(document.createTextNode(buf)); buf = ""; } };
  for (let i = 0; i < text.length;) {
    if (text[i] === "\\" && i + 1 < text.length) { buf += text[i + 1]; i += 2; continue; }
    if (text[i] === "`") {
      const end = text.indexOf("`", i + 1);
      if (end > i) {
        flush();
        const code = document.createElement("code");
        code.textContent = text.slice(i + 1, end);
        parent.appendChild(code);
        i = end + 1;
        continue;
      }
    }
    if (text.startsWith("**", i)) {
      const end = text.indexOf("**", i + 2);
      if (end > i + 1) {
        flush();
        const strong = document.createElement("strong");
        inline(text.slice(i + 2, end), strong);
        parent.appendChild(strong);
        i = end + 2;
        continue;
      }
    }
    buf += text[i];
    i += 1;
  }
  flush();
}

// The cells of a table row, split on unescaped "|" (escapes stay for inline() to resolve).
function cells(line) {
  const out = [];
  let cell = "";
  const body = line.trim().replace(/^\|/, "");
  for (let i = 0; i < body.length; i += 1) {
    if (body[i] === "\\" && i + 1 < body.length) { cell += body[i] + body[i + 1]; i += 1; }
    else if (body[i] === "|") { out.push(cell.trim()); cell = ""; }
    else { cell += body[i]; }
  }
  if (cell.trim()) out.push(cell.trim());
  return out;
}

function renderMarkdown(text, container) {
  container.replaceChildren();
  const lines = text.split("\n");
  const isBlock = (l) => !l.trim() || /^(#{1,6}\s|\||[-*]\s|>)/.test(l);
  const add = (tag, parent) => parent.appendChild(document.createElement(tag));
  for (let i = 0; i < lines.length;) {
    const line = lines[i];
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    if (!line.trim()) { i += 1; }
    else if (heading) { inline(heading[2], add("h" + Math.min(heading[1].length + 2, 6), container)); i += 1; }
    else if (line.startsWith("|")) {
      const table = add("table", container);
      let first = true;
      for (; i < lines.length && lines[i].startsWith("|"); i += 1) {
        if (/^\|[\s:|-]+$/.test(lines[i].trim())) continue;  // the separator row
        const row = add("tr", table);
        for (const cell of cells(lines[i])) inline(cell, add(first ? "th" : "td", row));
        first = false;
      }
    } else if (/^[-*]\s/.test(line)) {
      const list = add("ul", container);
      for (; i < lines.length && /^[-*]\s/.test(lines[i]); i += 1) inline(lines[i].slice(2), add("li", list));
    } else if (line.startsWith(">")) {
      const quote = add("blockquote", container);
      const parts = [];
      for (; i < lines.length && lines[i].startsWith(">"); i += 1) parts.push(lines[i].replace(/^>\s?/, ""));
      inline(parts.join(" "), quote);
    } else {
      const parts = [];
      for (; i < lines.length && !isBlock(lines[i]); i += 1) parts.push(lines[i]);
      inline(parts.join(" "), add("p", container));
    }
  }
}

async function loadCard() {
  $("card-status").hidden = false;
  const response = await fetch("/v1/model/card");
  if (!response.ok) {
    $("card-status").textContent = "No model card: " + await detail(response);
    $("card-details").hidden = true;
    return;
  }
  renderMarkdown(await response.text(), $("model-card"));
  $("card-status").hidden = true;
  $("card-details").hidden = false;
}

function interval(value, ci) {
  if (value === null || value === undefined) return "";
  return value.toFixed(3) + (ci ? " [" + ci[0].toFixed(2) + ", " + ci[1].toFixed(2) + "]" : "");
}

async function loadHistory() {
  $("history-status").hidden = false;
  const response = await fetch("/v1/history");
  if (!response.ok) {
    $("history-status").textContent = "The history cannot be read: " + await detail(response);
    $("history-details").hidden = true;
    return;
  }
  const data = await response.json();
  const body = $("history-table").tBodies[0];
  body.replaceChildren();
  for (const v of data.versions) {
    const row = body.insertRow();
    row.className = (v.champion_now ? "champion " : "") + (v.archived ? "archived" : "");
    row.dataset.version = v.version;
    const values = [v.version, (v.registered_at || "").slice(0, 10), (v.logical_date || "").slice(0, 10),
      v.decision || "", v.data_check || "", interval(v.roc_auc, v.roc_auc_ci95), interval(v.sensitivity, null),
      interval(v.specificity, null), v.training_images ?? "", String(v.dataset_version || "").slice(0, 12),
      v.aliases.join(", ") + (v.archived ? (v.aliases.length ? ", " : "") + "archived" : "")];
    for (const value of values) row.insertCell().textContent = String(value);
  }
  $("history-status").textContent = data.versions.length ? "" : "No version of " + data.model + " is registered yet.";
  $("history-status").hidden = data.versions.length > 0;
  $("history-details").hidden = data.versions.length === 0;
  const image = $("history-timeline");
  if (data.timeline) {
    image.onload = () => { image.hidden = false; };
    image.onerror = () => { image.hidden = true; };
    image.src = data.timeline + "?champion=" + encodeURIComponent(data.champion);
  } else {
    image.hidden = true;
  }
}

function loadPanels() {
  loadCard().catch((e) => { $("card-status").textContent = "The service cannot be reached: " + e; });
  loadHistory().catch((e) => { $("history-status").textContent = "The service cannot be reached: " + e; });
}

function setUp() {
  const zone = $("drop-zone");
  $("model-status").hidden = false;  // both stay hidden without JavaScript (the <noscript> parts show)
  $("upload").hidden = false;
  $("file-input").addEventListener("change", (e) => { if (e.target.files.length) classify(e.target.files[0]); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
  });
  $("show-heatmap").addEventListener("change", (e) => { $("heatmap").hidden = !e.target.checked || !$("heatmap").src; });
  $("heatmap-opacity").addEventListener("input", (e) => { $("heatmap").style.opacity = e.target.value / 100; });
  loadModel().catch((e) => { $("model-status").textContent = "The service cannot be reached: " + e; });
  loadPanels();
}

setUp();
