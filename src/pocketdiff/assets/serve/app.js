// The pocketdiff page: read the model's settings, send a generation request, show its progress and results.
"use strict";
const $ = (id) => document.getElementById(id);
let settings = null;

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("apikey").value || localStorage.getItem("pocketdiff-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadSettings() {
  const r = await fetch("/v1/settings", {headers: headers()});
  if (r.status === 401) { $("keyrow").hidden = false; $("model").textContent = "API key required"; return; }
  settings = await r.json();
  $("model").textContent = settings.model + " · " + settings.sizes.join(", ");
  $("steps").placeholder = settings.steps; $("steps").max = settings.max_steps;
  $("guidance").placeholder = settings.guidance; $("n").max = settings.max_n;
  for (const s of settings.samplers) {
    const o = document.createElement("option");
    o.value = s; o.textContent = s; o.selected = s === settings.sampler;
    $("sampler").appendChild(o);
  }
}

function requestBody() {
  const body = {prompt: $("prompt").value, n: Number($("n").value) || 1, response_format: "b64_json",
                sampler: $("sampler").value || undefined};
  if ($("steps").value) body.steps = Number($("steps").value);
  if ($("guidance").value) body.guidance = Number($("guidance").value);
  body.seed = $("seed").value ? Number($("seed").value) : Math.floor(Math.random() * 2 ** 31);
  if ($("negative").value) body.negative_prompt = $("negative").value;
  return body;
}

function pollProgress(id, steps) {
  const bar = $("progress");
  bar.hidden = false; bar.value = 0;
  const timer = setInterval(async () => {
    const r = await fetch("/v1/progress/" + id, {headers: headers()});
    if (!r.ok) return;
    const p = await r.json();
    bar.max = p.steps; bar.value = Math.min(p.step, p.steps);
    $("status").textContent = p.state === "queued" ? "queued (" + p.queue_depth + " waiting)" : "step " + p.step + " / " + p.steps;
  }, 150);
  return () => { clearInterval(timer); bar.hidden = true; };
}

function addResult(b64, body, i, seconds) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + b64;
  img.alt = body.prompt;
  const cap = document.createElement("figcaption");
  cap.textContent = body.prompt + " · seed " + (body.seed + i) + " · " + (body.sampler || settings.sampler) + " " +
    (body.steps || settings.steps) + " steps · guidance " + (body.guidance ?? settings.guidance) + " · " + seconds.toFixed(2) + " s";
  fig.append(img, cap);
  $("gallery").prepend(fig);
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if ($("apikey").value) localStorage.setItem("pocketdiff-key", $("apikey").value);
  if (!settings) await loadSettings();
  const body = requestBody();
  const id = crypto.randomUUID ? crypto.randomUUID().replaceAll("-", "") : String(Date.now());
  $("go").disabled = true; $("status").textContent = "sending";
  const stop = pollProgress(id, body.steps || settings.steps);
  const t0 = performance.now();
  try {
    const r = await fetch("/v1/images/generations", {method: "POST", headers: {...headers(), "X-Request-ID": id},
                                                      body: JSON.stringify(body)});
    const answer = await r.json();
    if (!r.ok) { $("status").textContent = "error: " + answer.error.message; return; }
    const seconds = (performance.now() - t0) / 1000;
    answer.data.map((d, i) => [d, i]).reverse().forEach(([d, i]) => addResult(d.b64_json, body, i, seconds));
    $("status").textContent = "done";
  } catch (e) {
    $("status").textContent = "error: " + e;
  } finally {
    stop(); $("go").disabled = false;
  }
});

loadSettings();
