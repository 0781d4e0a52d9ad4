// imram search page: text -> images, image -> captions, and per-step attention explanations.
// Plain browser JavaScript, no build step and no external resources.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // Word-score colours, low to high (also painted into the legend bar).
  const SCORE_STOPS = [
    [247, 244, 233],
    [252, 196, 84],
    [222, 103, 45],
    [140, 29, 64],
  ];
  const HEAT = [230, 40, 30]; // attention overlay colour
  const HEAT_MAX_ALPHA = 0.6; // alpha of the strongest region (alpha is proportional to weight)
  const CANVAS_SIZE = 240; // CSS pixels of each step's square canvas

  const state = {
    health: null,
    explain: null, // the /explain response on display
    image: null, // the decoded picture of the explained result, or null
    word: "all", // "all" or the index of the selected word
    token: 0, // guards against answers of superseded requests
  };

  // ---- API -----------------------------------------------------------------------------------

  async function api(url, options) {
    let response;
    try {
      response = await fetch(url, options);
    } catch (err) {
      throw new Error(`Cannot reach the server (${err.message}).`);
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`.trim();
      if (body && typeof body.error === "string") message = body.error;
      else if (body && body.detail !== undefined) message = JSON.stringify(body.detail);
      throw new Error(message);
    }
    if (body === null) throw new Error("The server sent a response that is not JSON.");
    return body;
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    const box = $("error");
    box.textContent = "";
    box.hidden = true;
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  function fmt(value, digits = 3) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
  }

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("aria-") || key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) node.append(child);
    return node;
  }

  // ---- health --------------------------------------------------------------------------------

  async function loadHealth() {
    try {
      const h = await api("/health");
      state.health = h;
      const parts = [`${h.images} images`, `${h.captions} captions`];
      if (h.model) parts.push(`model ${h.model}`);
      parts.push(h.rerank ? `re-ranked by ${h.rerank}` : "no re-ranker");
      if (h.explain === false) parts.push("explanations unavailable");
      $("health").textContent = parts.join(" · ");
      if (h.image_search === false) {
        $("file").disabled = true;
        $("search-image").disabled = true;
        $("image-hint").textContent = "This gallery cannot take picture queries.";
      }
    } catch (err) {
      $("health").textContent = `Server unavailable: ${err.message}`;
    }
  }

  // ---- results -------------------------------------------------------------------------------

  function clearResults() {
    $("results").replaceChildren();
    hideExplain();
  }

  function hideExplain() {
    state.token += 1;
    state.explain = null;
    state.image = null;
    $("explain").hidden = true;
    $("steps").replaceChildren();
  }

  async function searchText(event) {
    event.preventDefault();
    clearError();
    const q = $("query").value;
    const k = $("k").value.trim() || "12";
    const token = ++state.token;
    setStatus("Searching…");
    try {
      const data = await api(`/search/text?${new URLSearchParams({ q, k })}`);
      if (token !== state.token) return;
      renderImageHits(data.query ?? q, data.hits);
    } catch (err) {
      if (token !== state.token) return;
      clearResults();
      setStatus("");
      showError(err.message);
    }
  }

  function renderImageHits(query, hits) {
    clearResults();
    $("results").dataset.kind = "images";
    setStatus(
      hits.length
        ? `${hits.length} images for “${query}”. Choose one to see why it matches.`
        : `No images for “${query}”.`,
    );
    for (const hit of hits) {
      const url = hit.image_url || `/images/${encodeURIComponent(hit.id)}`;
      const img = el("img", { src: url, alt: hit.name || `image ${hit.id}`, decoding: "async" });
      const button = el(
        "button",
        {
          type: "button",
          class: "tile",
          "aria-pressed": "false",
          "aria-label": `Explain result ${hit.rank}: ${hit.name} (score ${fmt(hit.score)})`,
        },
        [
          img,
          el("span", { class: "meta" }, [
            el("span", { class: "rank", text: `#${hit.rank}` }),
            el("span", { class: "score", text: fmt(hit.score) }),
          ]),
          el("span", { class: "name", text: hit.name || `image ${hit.id}` }),
        ],
      );
      button.addEventListener("click", () => {
        for (const other of document.querySelectorAll("#results .tile")) {
          other.setAttribute("aria-pressed", String(other === button));
        }
        explain(query, hit, url);
      });
      const item = el("li", { class: "result", "data-id": String(hit.id) }, [button]);
      $("results").append(item);
    }
  }

  async function searchImage(event) {
    event.preventDefault();
    clearError();
    const file = $("file").files[0];
    if (!file) {
      showError("Choose a picture first.");
      return;
    }
    const form = new FormData();
    form.append("file", file);
    const k = $("k").value.trim();
    const url = k ? `/search/image?${new URLSearchParams({ k })}` : "/search/image";
    const token = ++state.token;
    setStatus("Searching…");
    try {
      const data = await api(url, { method: "POST", body: form });
      if (token !== state.token) return;
      renderCaptionHits(file.name, data.hits);
    } catch (err) {
      if (token !== state.token) return;
      clearResults();
      setStatus("");
      showError(err.message);
    }
  }

  function renderCaptionHits(fileName, hits) {
    clearResults();
    $("results").dataset.kind = "captions";
    setStatus(
      hits.length ? `${hits.length} captions for ${fileName}.` : `No captions for ${fileName}.`,
    );
    for (const hit of hits) {
      const thumb = hit.image_url
        ? el("img", { class: "thumb", src: hit.image_url, alt: "", decoding: "async" })
        : el("span", { class: "thumb" });
      const reuse = el("button", { type: "button", class: "link", text: "Search images" });
      reuse.setAttribute("aria-label", `Search images described by: ${hit.name}`);
      reuse.addEventListener("click", () => {
        $("query").value = hit.name;
        $("text-form").requestSubmit();
      });
      const item = el("li", { class: "result caption-result", "data-id": String(hit.id) }, [
        thumb,
        el("span", { class: "meta" }, [
          el("span", { class: "rank", text: `#${hit.rank}` }),
          el("span", { class: "score", text: fmt(hit.score) }),
        ]),
        el("p", { class: "name caption", text: hit.name }),
        reuse,
      ]);
      $("results").append(item);
    }
  }

  // ---- explanation ---------------------------------------------------------------------------

  function loadImage(url) {
    return new Promise((resolve) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => resolve(null);
      img.src = url;
    });
  }

  async function explain(query, hit, url) {
    clearError();
    const token = ++state.token;
    const panel = $("explain");
    panel.hidden = false;
    panel.setAttribute("aria-busy", "true");
    $("steps").replaceChildren();
    $("explain-summary").textContent = `Explaining “${query}” against ${hit.name}…`;
    try {
      const params = new URLSearchParams({ q: query, image_id: String(hit.id) });
      const [data, image] = await Promise.all([api(`/explain?${params}`), loadImage(url)]);
      if (!Array.isArray(data.words) || !Array.isArray(data.steps)) {
        throw new Error("The server's explanation has no words or steps.");
      }
      if (token !== state.token) return;
      state.explain = data;
      state.image = image;
      state.word = "all";
      $("explain-summary").textContent = summary(query, data.name || hit.name, data, image);
      buildWordSelect(data.words);
      renderSteps();
      panel.setAttribute("aria-busy", "false");
      panel.scrollIntoView({ block: "nearest" });
    } catch (err) {
      if (token !== state.token) return;
      panel.hidden = true;
      panel.setAttribute("aria-busy", "false");
      showError(err.message);
    }
  }

  function summary(query, name, data, image) {
    const steps = data.steps.length;
    let text = `“${query}” against ${name}: score ${fmt(data.score)}.`;
    const branches = data.branch_scores || {};
    if (typeof branches.text === "number" && typeof branches.image === "number") {
      text += ` Words attending over regions give ${fmt(branches.text)} in ${steps} `;
      text += `step${steps === 1 ? "" : "s"} (shown), regions attending over words `;
      text += `${fmt(branches.image)}.`;
    } else {
      text += ` ${steps} matching step${steps === 1 ? "" : "s"} of words attending over regions.`;
    }
    if (!image) text += " The picture could not be loaded.";
    return text;
  }

  function buildWordSelect(words) {
    const select = $("word");
    select.replaceChildren(el("option", { value: "all", text: "all words (average)" }));
    words.forEach((word, i) => select.append(el("option", { value: String(i), text: word })));
    select.value = "all";
  }

  function selectWord(value) {
    state.word = value;
    $("word").value = value;
    renderSteps();
  }

  function scoreRange(steps) {
    let low = Infinity;
    let high = -Infinity;
    for (const step of steps) {
      for (const s of step.word_scores) {
        if (Number.isFinite(s)) {
          low = Math.min(low, s);
          high = Math.max(high, s);
        }
      }
    }
    if (!Number.isFinite(low)) return [0, 1];
    if (high - low < 1e-9) return [low - 0.5, high + 0.5];
    return [low, high];
  }

  function scoreColour(t) {
    const x = Math.min(1, Math.max(0, t)) * (SCORE_STOPS.length - 1);
    const i = Math.min(SCORE_STOPS.length - 2, Math.floor(x));
    const f = x - i;
    const rgb = SCORE_STOPS[i].map((c, j) => Math.round(c + f * (SCORE_STOPS[i + 1][j] - c)));
    const light = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 150;
    return { background: `rgb(${rgb.join(",")})`, color: light ? "#1b1b1b" : "#ffffff" };
  }

  // The model reads <start> and <end> around the query; they are shown but not averaged.
  function isMarker(word) {
    return ["<start>", "<end>", "[CLS]", "[SEP]"].includes(word);
  }

  function paintLegend(low, high) {
    const stops = SCORE_STOPS.map((c) => `rgb(${c.join(",")})`).join(", ");
    document.querySelector("#legend .legend-bar").style.background =
      `linear-gradient(to right, ${stops})`;
    const [r, g, b] = HEAT;
    document.querySelector("#legend .legend-attn-bar").style.background =
      `linear-gradient(to right, rgba(${r},${g},${b},0), rgba(${r},${g},${b},${HEAT_MAX_ALPHA}))`;
    $("legend-low").textContent = fmt(low);
    $("legend-high").textContent = fmt(high);
  }

  function attentionOf(step) {
    const all = step.attention;
    if (state.word !== "all") return all[Number(state.word)] || [];
    const words = state.explain.words;
    const real = all.filter((_, i) => !isMarker(words[i]));
    const rows = real.length ? real : all;
    const n = rows.length ? rows[0].length : 0;
    const mean = new Array(n).fill(0);
    for (const row of rows) row.forEach((w, r) => (mean[r] += w / rows.length));
    return mean;
  }

  function gridOf(data, regions) {
    const grid = data.grid;
    if (Array.isArray(grid) && grid.length === 2 && grid[0] * grid[1] === regions) return grid;
    return [1, Math.max(1, regions)]; // no usable grid: one row of regions
  }

  // Where the picture lies in the square the features were computed from.
  function pictureBox(image, size) {
    const mode = (state.health && state.health.resize) || "pad";
    const w = image.naturalWidth;
    const h = image.naturalHeight;
    if (mode === "stretch") return { sx: 0, sy: 0, sw: w, sh: h, dx: 0, dy: 0, dw: size, dh: size };
    if (mode === "center_crop") {
      const side = Math.min(w, h);
      return {
        sx: (w - side) / 2, sy: (h - side) / 2, sw: side, sh: side,
        dx: 0, dy: 0, dw: size, dh: size,
      };
    }
    const scale = size / Math.max(w, h);
    const dw = w * scale;
    const dh = h * scale;
    return { sx: 0, sy: 0, sw: w, sh: h, dx: (size - dw) / 2, dy: (size - dh) / 2, dw, dh };
  }

  function drawStep(canvas, step) {
    const ratio = window.devicePixelRatio || 1;
    const size = CANVAS_SIZE;
    canvas.width = Math.round(size * ratio);
    canvas.height = Math.round(size * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = "#ffffff"; // the extractor's padding colour
    ctx.fillRect(0, 0, size, size);
    if (state.image) {
      const b = pictureBox(state.image, size);
      ctx.drawImage(state.image, b.sx, b.sy, b.sw, b.sh, b.dx, b.dy, b.dw, b.dh);
    } else {
      ctx.fillStyle = "#d9d9d9";
      ctx.fillRect(0, 0, size, size);
    }
    const weights = attentionOf(step);
    const [rows, cols] = gridOf(state.explain, weights.length);
    const peak = Math.max(0, ...weights.filter(Number.isFinite));
    const cw = size / cols;
    const ch = size / rows;
    const [r, g, b] = HEAT;
    weights.forEach((w, i) => {
      const alpha = peak > 0 && Number.isFinite(w) ? (HEAT_MAX_ALPHA * Math.max(0, w)) / peak : 0;
      ctx.fillStyle = `rgba(${r},${g},${b},${alpha})`;
      ctx.fillRect((i % cols) * cw, Math.floor(i / cols) * ch, cw, ch);
    });
    ctx.strokeStyle = "rgba(255,255,255,0.55)";
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let c = 1; c < cols; c++) {
      ctx.moveTo(c * cw, 0);
      ctx.lineTo(c * cw, size);
    }
    for (let q = 1; q < rows; q++) {
      ctx.moveTo(0, q * ch);
      ctx.lineTo(size, q * ch);
    }
    ctx.stroke();
    const best = weights.indexOf(peak);
    if (peak > 0 && best >= 0) {
      ctx.strokeStyle = "rgba(120,10,10,0.95)";
      ctx.lineWidth = 2;
      ctx.strokeRect((best % cols) * cw + 1, Math.floor(best / cols) * ch + 1, cw - 2, ch - 2);
    }
  }

  function renderSteps() {
    const data = state.explain;
    if (!data) return;
    const [low, high] = scoreRange(data.steps);
    paintLegend(low, high);
    const subject =
      state.word === "all" ? "all words (average)" : `“${data.words[Number(state.word)]}”`;
    const figures = data.steps.map((step, k) => {
      const canvas = el("canvas", {
        class: "step",
        "aria-label": `Step ${k + 1}: attention of ${subject} over the picture's regions`,
        "data-step": String(k + 1),
      });
      canvas.setAttribute("role", "img");
      drawStep(canvas, step);
      const words = el("p", { class: "words", "aria-label": `Word scores of step ${k + 1}` });
      data.words.forEach((word, i) => {
        const score = step.word_scores[i];
        const colour = scoreColour((score - low) / (high - low));
        const selected = String(i) === state.word;
        const chip = el("button", {
          type: "button",
          class: ["word", isMarker(word) && "marker", selected && "selected"]
            .filter(Boolean)
            .join(" "),
          text: word,
          title: `${word}: ${fmt(score)}`,
          "aria-label": `${word}, score ${fmt(score)}`,
          "aria-pressed": String(selected),
          "data-score": String(score),
        });
        chip.style.background = colour.background;
        chip.style.color = colour.color;
        chip.addEventListener("click", () => selectWord(selected ? "all" : String(i)));
        words.append(chip);
      });
      const caption = el("figcaption", {
        text: `Step ${k + 1} · score ${fmt(step.step_score)}`,
      });
      return el("figure", { class: "step-figure" }, [caption, canvas, words]);
    });
    $("steps").replaceChildren(...figures);
  }

  // ---- wiring --------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("text-form").addEventListener("submit", searchText);
    $("image-form").addEventListener("submit", searchImage);
    $("word").addEventListener("change", (event) => selectWord(event.target.value));
    loadHealth();
  });
})();
