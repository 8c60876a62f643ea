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
    if (!model || model.version !== $("result-version").textContent) { loadModel(); }
  } catch (e) {
    showError("The service cannot be reached: " + e);
  } finally {
    $("busy").hidden = true;
  }
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
}

setUp();
