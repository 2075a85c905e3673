// Frankenmerge Studio: layer-stack editor, the body of gr.HTML's js_on_load.
//
// Gradio runs this once per mount as Function("element", "trigger", "props", "server", "upload", "watch", <this file>).
//   element  the component's root <div>; html_template (a static shell) is already inside it
//   props    a Proxy over the component's props; assigning a NEW object to props.value sends it to
//            Python and fires .change (the proxy compares by identity, so in-place edits do nothing)
//   watch    watch("value", cb) runs cb after Python has sent a new value
//
// Facts come from Python as props (ui/stack.py stack_widget), never written here: blend_methods (the
// blend methods, in the page's order, each {name, base, weight, t?}: how it treats the base model,
// "required", "optional" or "ignored" as in mergekit; whether each source takes a weight; the slice's
// `t` box {value, max?, step, hint} when it takes one), max_repeat (the largest `repeat` a recipe takes).
//
// Everything below the shell is drawn here, from props.value plus a little local UI state (the drag
// selection). All listeners are delegated on `element`, so redrawing never loses a handler.
//
// Value: {models: [{ref, label, num_layers, stacking}], slices: [{model, start, end, repeat, parameters?, blend?,
// slice_parameters?}], merge_method?, base_model?, parameters?,
// seam_scores?: {"i" | "i-rep-r": number | {measured, predicted}}} (angular distances, 0..1; ui/stack.py documents
// it). A blended slice's first source is {model, start, end}; the others are in `blend`. Slices are end-exclusive;
// the UI writes ranges in human, inclusive form ("layers 2–5 (4)").

const root = element.querySelector(".fs-root") || element;
const PALETTE = ["#4f9dff", "#f5a524", "#2fc98f", "#e85d9a", "#a78bfa", "#22c3d6", "#f0d14a", "#ff7a59"];
const MAX_REPEAT = props.max_repeat;
const METHODS = Object.fromEntries(props.blend_methods.map((m) => [m.name, m]));
const BLEND_METHODS = props.blend_methods.map((m) => m.name);
const factsOf = (method) => METHODS[method] || { base: "ignored" };
const ICON_DUP =
  '<svg viewBox="0 0 16 16" width="12" height="12" aria-hidden="true"><rect x="5" y="5" width="9" height="9" rx="1.5" fill="none" stroke="currentColor" stroke-width="1.6"/><path d="M11 3.5V3a1 1 0 0 0-1-1H3a1 1 0 0 0-1 1v7a1 1 0 0 0 1 1h.5" fill="none" stroke="currentColor" stroke-width="1.6"/></svg>';
const ICON_REMOVE =
  '<svg viewBox="0 0 16 16" width="12" height="12" aria-hidden="true"><path d="M3.5 3.5l9 9M12.5 3.5l-9 9" stroke="currentColor" stroke-width="1.8" stroke-linecap="round"/></svg>';

// Local, browser-only state: the range being selected in one column.
let sel = null; // {col, anchor, a, b} with a <= b, inclusive layer indices
let dragging = false; // mouse button held since a mousedown on a cell
let dragSlice = null; // index of the slice being moved by HTML5 drag-and-drop

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[ch]);
}

function toInt(x, fallback) {
  const n = Number.parseInt(x, 10);
  return Number.isFinite(n) ? n : fallback;
}

function current() {
  const v = props.value && typeof props.value === "object" ? props.value : {};
  return {
    models: Array.isArray(v.models) ? v.models : [],
    slices: Array.isArray(v.slices) ? v.slices : [],
    seam_scores: v.seam_scores && typeof v.seam_scores === "object" ? v.seam_scores : null,
    merge_method: typeof v.merge_method === "string" ? v.merge_method : "passthrough",
    base_model: typeof v.base_model === "string" ? v.base_model : null,
  };
}

// Send an edit: everything but the slices passes through untouched (unless `extra` sets it), slices is a new list,
// and seam scores are dropped (they belong to the stack they were measured on).
function commit(newSlices, extra = {}) {
  const v = props.value && typeof props.value === "object" ? props.value : {};
  const next = { ...v, seam_scores: null, ...extra, models: current().models, slices: newSlices.map((s) => ({ ...s })) };
  props.value = next;
  render();
}

// ---------------------------------------------------------------- blends

function sourcesOf(s) {
  return [{ model: s.model, start: s.start, end: s.end, parameters: s.parameters }, ...(s.blend || [])];
}

// A slice from its sources: the first names its place in the stack, the rest go to `blend`.
function withSources(s, sources) {
  const [first, ...rest] = sources;
  const out = { ...s, model: first.model, start: first.start, end: first.end };
  delete out.parameters;
  delete out.blend;
  if (first.parameters) out.parameters = first.parameters;
  if (rest.length) out.blend = rest;
  else delete out.slice_parameters;
  return out;
}

function isNumber(x) {
  return typeof x === "number" && Number.isFinite(x);
}

// The parameters the widget edits, made to fit `method` (switched to from `previous`): a weight per source, one t
// per blended slice (a t that meant something else under `previous` starts again), or neither (mergekit refuses
// parameters a method does not take). Non-numeric settings stay.
function adaptToMethod(slices, method, previous = method) {
  const facts = factsOf(method);
  const tChanged = facts.t !== factsOf(previous).t;
  return slices.map((s) => {
    if (!(s.blend || []).length) return s;
    const sources = sourcesOf(s).map((src) => {
      const params = { ...(src.parameters || {}) };
      if (!facts.weight && isNumber(params.weight)) delete params.weight;
      if (facts.weight && params.weight === undefined) params.weight = 1;
      return { ...src, parameters: Object.keys(params).length ? params : undefined };
    });
    const out = withSources(s, sources);
    const sp = { ...(s.slice_parameters || {}) };
    if (facts.t && (sp.t === undefined || (tChanged && isNumber(sp.t)))) sp.t = facts.t.value;
    if (!facts.t && isNumber(sp.t)) delete sp.t;
    if (Object.keys(sp).length) out.slice_parameters = sp;
    else delete out.slice_parameters;
    return out;
  });
}

// Blending slice i with model `ref`: the same layer range when the model has it, else its first layers.
function addSource(i, ref) {
  const v = current();
  const m = v.models.find((mm) => mm.ref === ref);
  const s = v.slices[i];
  if (!m || !s) return;
  const n = span(s);
  const layers = toInt(m.num_layers, 0);
  if (n > layers) return;
  const start = toInt(s.end, 0) <= layers ? toInt(s.start, 0) : 0;
  const slices = v.slices.slice();
  slices[i] = withSources(s, [...sourcesOf(s), { model: ref, start, end: start + n }]);
  const method = v.merge_method === "passthrough" ? "linear" : v.merge_method;
  const extra = { merge_method: method };
  if (factsOf(method).base === "required" && !v.base_model) extra.base_model = s.model;
  commit(adaptToMethod(slices, method), extra);
}

function removeSource(i, j) {
  const v = current();
  const s = v.slices[i];
  if (!s) return;
  const sources = sourcesOf(s);
  if (j < 0 || j >= sources.length || sources.length < 2) return;
  sources.splice(j, 1);
  const slices = v.slices.slice();
  slices[i] = withSources(s, sources);
  commit(slices);
}

function renderSources(s, i, v) {
  const facts = factsOf(v.merge_method);
  const rows = sourcesOf(s).map((src, j) => {
    const w = src.parameters ? src.parameters.weight : undefined;
    const isBase = facts.base !== "ignored" && src.model === v.base_model;
    let weight = "";
    if (isBase) weight = '<span class="fs-muted">base</span>';
    else if (!facts.weight) weight = "";
    else if (w === undefined || isNumber(w))
      weight = `<label class="fs-weight" title="weight">w <input type="number" step="0.05" value="${isNumber(w) ? w : ""}" data-testid="source-weight-${i}-${j}" data-slice="${i}" data-source="${j}" /></label>`;
    else weight = '<span class="fs-muted" title="a gradient or filter from the YAML">custom</span>';
    return `
      <div class="fs-source" data-testid="source-${i}-${j}" style="--mc:${colourFor(src.model, v.models)}">
        <span class="fs-swatch"></span>
        <span class="fs-source-name" title="${esc(src.model)}">${esc(labelFor(src.model, v.models))}</span>
        <span class="fs-muted">${human(toInt(src.start, 0), toInt(src.end, 0))}</span>
        ${weight}
        <button type="button" class="fs-btn fs-icon fs-danger" data-testid="source-remove-${i}-${j}" data-action="unblend" data-slice="${i}" data-source="${j}" title="Take this source out of the blend">${ICON_REMOVE}</button>
      </div>`;
  });
  let t = "";
  if (facts.t) {
    const raw = s.slice_parameters ? s.slice_parameters.t : undefined;
    t =
      raw === undefined || isNumber(raw)
        ? `<label class="fs-weight" title="${esc(facts.t.hint)}">t <input type="number" min="0" ${facts.t.max === undefined ? "" : `max="${facts.t.max}"`} step="${facts.t.step}" value="${isNumber(raw) ? raw : ""}" data-testid="slice-t-${i}" data-slice="${i}" /></label>`
        : '<span class="fs-muted">t: custom</span>';
  }
  return `<div class="fs-sources" data-testid="slice-sources-${i}">${rows.join("")}${t}</div>`;
}

// Only columns whose layers fit this slice's: the same `stacking` key (architecture, hidden size, a layer's
// tensor shapes, computed in Python) and enough layers.
function renderBlendPicker(s, i, v) {
  const inSlice = new Set(sourcesOf(s).map((src) => src.model));
  const own = v.models.find((m) => m.ref === s.model);
  const stacking = own ? own.stacking : undefined;
  const options = v.models
    .filter((m) => !inSlice.has(m.ref) && m.stacking === stacking && toInt(m.num_layers, 0) >= span(s))
    .map((m) => `<option value="${esc(m.ref)}">${esc(m.label || m.ref)}</option>`);
  if (!options.length) return "";
  return `<select class="fs-blend-add" data-testid="slice-blend-${i}" data-slice="${i}" title="Blend this slice with the same layers of another model"><option value="">+ blend</option>${options.join("")}</select>`;
}

function renderBlendControls(v) {
  if (!v.slices.some((s) => (s.blend || []).length)) return "";
  const methods = BLEND_METHODS.map(
    (m) => `<option value="${m}" ${m === v.merge_method ? "selected" : ""}>${m}</option>`,
  ).join("");
  const policy = factsOf(v.merge_method).base;
  const none = policy === "optional" ? `<option value="" ${v.base_model ? "" : "selected"}>none</option>` : "";
  const base =
    policy === "ignored"
      ? ""
      : `<label>base <select data-testid="blend-base" class="fs-blend-base">${none}${v.models
          .map((m) => `<option value="${esc(m.ref)}" ${m.ref === v.base_model ? "selected" : ""}>${esc(m.label || m.ref)}</option>`)
          .join("")}</select></label>`;
  return `<div class="fs-blend-controls"><label>blend <select data-testid="blend-method" class="fs-blend-method">${methods}</select></label>${base}</div>`;
}

function colourFor(ref, models) {
  const i = models.findIndex((m) => m.ref === ref);
  return i >= 0 ? PALETTE[i % PALETTE.length] : "#8a8f98";
}

function labelFor(ref, models) {
  const m = models.find((mm) => mm.ref === ref);
  return m ? m.label || m.ref : ref;
}

// The plan's seam rule (merger.plan.seam_depths; ui/stack.py seam_positions() applies it to this value),
// drawn at once on every edit: slice i > 0 starts with a seam unless it continues slice i-1 exactly
// (same model, previous end == this start). tests/browser/test_stack_widget.py holds the two to one answer.
function hasSeam(slices, i) {
  if (i <= 0) return false;
  const p = slices[i - 1];
  const s = slices[i];
  return !(p.model === s.model && toInt(p.end, 0) === toInt(s.start, 0));
}

function span(s) {
  return Math.max(0, toInt(s.end, 0) - toInt(s.start, 0));
}

function reps(s) {
  return Math.max(1, toInt(s.repeat, 1)); // the input caps edits at MAX_REPEAT; a pasted recipe is shown as is
}

function human(start, endExclusive) {
  const n = endExclusive - start;
  if (n <= 0) return "no layers";
  return n === 1 ? `layer ${start} (1)` : `layers ${start}–${endExclusive - 1} (${n})`;
}

// Green at no damage, red from SCORE_RED up: seams of working merges measure about 0.05-0.3.
const SCORE_RED = 0.4;

function scoreColour(score) {
  const s = Math.min(1, Math.max(0, score / SCORE_RED));
  return `hsl(${Math.round(120 * (1 - s))}, 75%, 48%)`;
}

function finite(raw) {
  const x = typeof raw === "number" ? raw : Number.parseFloat(raw);
  return Number.isFinite(x) ? x : null;
}

// {value, text}: the measured damage (or a bare number) colours the seam; both go in its title.
function seamScore(scores, key) {
  if (!scores || scores[key] === undefined || scores[key] === null) return null;
  const raw = scores[key];
  if (typeof raw !== "object") {
    const x = finite(raw);
    return x === null ? null : { value: x, text: `damage ${x.toFixed(3)}` };
  }
  const measured = finite(raw.measured);
  const predicted = finite(raw.predicted);
  const value = measured !== null ? measured : predicted;
  if (value === null) return null;
  const text = [measured !== null ? `measured ${measured.toFixed(3)}` : "", predicted !== null ? `predicted ${predicted.toFixed(3)}` : ""]
    .filter(Boolean)
    .join(", ");
  return { value, text };
}

// ---------------------------------------------------------------- drawing

function renderColumn(m, c, used) {
  const n = Math.max(0, toInt(m.num_layers, 0));
  const mine = sel && sel.col === c;
  const cells = [];
  for (let l = 0; l < n; l++) {
    const cls = ["fs-cell"];
    if (mine && l >= sel.a && l <= sel.b) cls.push("sel");
    if (used.has(l)) cls.push("used");
    cells.push(
      `<div class="${cls.join(" ")}" data-testid="cell-${c}-${l}" data-col="${c}" data-layer="${l}" title="layer ${l}">${l}</div>`,
    );
  }
  const addLabel = mine ? `Add ${human(sel.a, sel.b + 1)} ⟶` : "Add ⟶";
  return `
    <section class="fs-col" data-testid="stack-col-${c}" style="--mc:${PALETTE[c % PALETTE.length]}">
      <header class="fs-col-head">
        <span class="fs-swatch"></span>
        <span class="fs-col-name" title="${esc(m.ref)}">${esc(m.label || m.ref)}</span>
        <span class="fs-muted">${n} layers</span>
      </header>
      <div class="fs-grid">${cells.join("")}</div>
      <button type="button" class="fs-btn fs-add" data-testid="stack-add-${c}" data-col="${c}" ${mine ? "" : "disabled"}>${addLabel}</button>
    </section>`;
}

function renderSeam(id, score, title, extraClass) {
  const style = score === null ? "" : ` style="--seam:${scoreColour(score.value)}"`;
  let badge = "";
  if (score !== null) badge = `<span class="fs-seam-score" data-testid="score-${id}">${score.value.toFixed(2)}</span>`;
  else if (extraClass === "fs-seam-join") badge = `<span class="fs-seam-tag">seam</span>`;
  const kind = score === null ? "unscored" : "scored";
  return `<div class="fs-seam ${extraClass} ${kind}" data-testid="${id}" title="${esc(title)}"${style}><span class="fs-seam-line"></span>${badge}</div>`;
}

function renderSlice(s, i, v, offset) {
  const start = toInt(s.start, 0);
  const end = toInt(s.end, 0);
  const k = reps(s);
  const n = span(s);
  const label = labelFor(s.model, v.models);
  const passes = [];
  for (let r = 0; r < k; r++) {
    if (r > 0) {
      const a = offset + r * n;
      const score = seamScore(v.seam_scores, `${i}-rep-${r}`);
      passes.push(
        renderSeam(
          `seam-${i}-rep-${r}`,
          score,
          `Repeat seam: ${label} layer ${end - 1} feeds back into layer ${start} (merged ${a - 1} → ${a})` +
            (score === null ? "" : ` · ${score.text}`),
          "fs-seam-rep",
        ),
      );
    }
    passes.push(`<div class="fs-pass" style="--h:${Math.min(48, 6 + n)}px"></div>`);
  }
  const mergedA = offset;
  const mergedB = offset + n * k - 1;
  const blended = (s.blend || []).length > 0;
  const title = blended
    ? `<span class="fs-slice-name">Blend · ${esc(v.merge_method)}</span><span class="fs-muted">· ${sourcesOf(s).length} sources, ${n} layer${n === 1 ? "" : "s"}</span>`
    : `<span class="fs-slice-name">${esc(label)}</span><span class="fs-muted">· ${human(start, end)}</span>`;
  return `
    <div class="fs-slice${blended ? " fs-blended" : ""}" data-testid="slice-${i}" data-slice="${i}" draggable="true" style="--mc:${colourFor(s.model, v.models)}">
      <div class="fs-slice-bar">${passes.join("")}</div>
      <div class="fs-slice-body">
        <div class="fs-slice-title" title="${esc(s.model)} · [${start}, ${end}) end-exclusive">
          <span class="fs-grip" aria-hidden="true">⠿</span>
          ${title}
        </div>
        ${blended ? renderSources(s, i, v) : ""}
        <div class="fs-slice-meta fs-muted">${n * k > 0 ? `merged ${mergedA}–${mergedB}` : "empty"}${k > 1 ? ` · ${k} passes` : ""}</div>
      </div>
      <div class="fs-slice-tools">
        ${renderBlendPicker(s, i, v)}
        <label class="fs-rep" title="Repeat this slice (1–${MAX_REPEAT})">×<input type="number" min="1" max="${MAX_REPEAT}" step="1" value="${k}" data-testid="slice-repeat-${i}" data-slice="${i}" /></label>
        <button type="button" class="fs-btn fs-icon" data-testid="slice-dup-${i}" data-action="dup" data-slice="${i}" title="Duplicate this slice">${ICON_DUP}</button>
        <button type="button" class="fs-btn fs-icon fs-danger" data-testid="slice-remove-${i}" data-action="remove" data-slice="${i}" title="Remove this slice">${ICON_REMOVE}</button>
      </div>
    </div>`;
}

function renderStack(v) {
  let total = 0;
  let seams = 0;
  const parts = [];
  v.slices.forEach((s, i) => {
    if (hasSeam(v.slices, i)) {
      seams++;
      const prev = v.slices[i - 1];
      const score = seamScore(v.seam_scores, String(i));
      const title =
        `Seam before slice ${i}: ${labelFor(prev.model, v.models)} layer ${toInt(prev.end, 0) - 1}` +
        ` → ${labelFor(s.model, v.models)} layer ${toInt(s.start, 0)}` +
        (score === null ? "" : ` · ${score.text}`);
      parts.push(renderSeam(`seam-${i}`, score, title, "fs-seam-join"));
    }
    parts.push(renderSlice(s, i, v, total));
    seams += reps(s) - 1;
    total += span(s) * reps(s);
  });
  const body = parts.length
    ? parts.join("")
    : `<div class="fs-empty">Drag across layers on the left, then press <b>Add ⟶</b>.</div>`;
  return `
    <section class="fs-stack">
      <header class="fs-stack-head">
        <span>Merged stack</span>
        <span class="fs-pill"><b data-testid="merged-layers">${total}</b> layers</span>
        <span class="fs-muted">${v.slices.length} slice${v.slices.length === 1 ? "" : "s"} · ${seams} seam${seams === 1 ? "" : "s"}</span>
      </header>
      ${renderBlendControls(v)}
      <div class="fs-stack-top fs-muted">embeddings ↓ layer 0</div>
      <div class="fs-blocks">${body}</div>
      <div class="fs-stack-top fs-muted">↓ final norm · lm_head</div>
    </section>`;
}

function render() {
  const v = current();
  if (sel && (sel.col >= v.models.length || sel.b >= toInt(v.models[sel.col].num_layers, 0))) sel = null;
  const usedBy = v.models.map((m) => {
    const used = new Set();
    for (const src of v.slices.flatMap(sourcesOf)) {
      if (src.model !== m.ref) continue;
      for (let l = toInt(src.start, 0); l < toInt(src.end, 0); l++) used.add(l);
    }
    return used;
  });
  const cols = v.models.length
    ? v.models.map((m, c) => renderColumn(m, c, usedBy[c])).join("")
    : `<div class="fs-empty">Pick parent models to show their layers.</div>`;
  root.innerHTML = `<div class="fs-cols">${cols}</div>${renderStack(v)}`;
}

// Only the cells' classes and the Add button change while dragging; the DOM under the mouse stays.
function paintSelection() {
  root.querySelectorAll(".fs-cell.sel").forEach((el) => el.classList.remove("sel"));
  root.querySelectorAll(".fs-add").forEach((btn) => {
    const c = toInt(btn.dataset.col, -1);
    const mine = sel && sel.col === c;
    btn.disabled = !mine;
    btn.textContent = mine ? `Add ${human(sel.a, sel.b + 1)} ⟶` : "Add ⟶";
  });
  if (!sel) return;
  for (let l = sel.a; l <= sel.b; l++) {
    const cell = root.querySelector(`[data-testid="cell-${sel.col}-${l}"]`);
    if (cell) cell.classList.add("sel");
  }
}

function selectTo(col, layer) {
  if (!sel || sel.col !== col) sel = { col, anchor: layer, a: layer, b: layer };
  sel.a = Math.min(sel.anchor, layer);
  sel.b = Math.max(sel.anchor, layer);
  paintSelection();
}

// ---------------------------------------------------------------- events (delegated on element)

element.addEventListener("mousedown", (e) => {
  const cell = e.target.closest(".fs-cell");
  if (!cell || e.button !== 0) return;
  e.preventDefault(); // no text selection while sweeping
  const col = toInt(cell.dataset.col, 0);
  const layer = toInt(cell.dataset.layer, 0);
  if (e.shiftKey && sel && sel.col === col) {
    selectTo(col, layer); // extend from the anchor
  } else {
    sel = { col, anchor: layer, a: layer, b: layer };
    paintSelection();
  }
  dragging = true;
});

element.addEventListener("mousemove", (e) => {
  if (!dragging || !sel) return;
  const cell = e.target.closest(".fs-cell");
  if (!cell || toInt(cell.dataset.col, -1) !== sel.col) return;
  selectTo(sel.col, toInt(cell.dataset.layer, 0));
});

// mouseup may happen outside the widget; listen on the window but only while a sweep is live.
window.addEventListener("mouseup", () => {
  dragging = false;
});

element.addEventListener("click", (e) => {
  const add = e.target.closest(".fs-add");
  if (add) {
    const c = toInt(add.dataset.col, -1);
    const m = current().models[c];
    if (!m || !sel || sel.col !== c) return;
    const slice = { model: m.ref, start: sel.a, end: sel.b + 1, repeat: 1 };
    sel = null;
    commit([...current().slices, slice]);
    return;
  }
  const btn = e.target.closest("[data-action]");
  if (!btn) return;
  const i = toInt(btn.dataset.slice, -1);
  if (btn.dataset.action === "unblend") {
    removeSource(i, toInt(btn.dataset.source, -1));
    return;
  }
  const slices = current().slices.slice();
  if (i < 0 || i >= slices.length) return;
  if (btn.dataset.action === "dup") slices.splice(i + 1, 0, { ...slices[i] });
  else if (btn.dataset.action === "remove") slices.splice(i, 1);
  commit(slices);
});

// Blend edits: a source added, a weight or t typed, the method or base picked.
element.addEventListener("change", (e) => {
  const v = current();
  const picker = e.target.closest(".fs-blend-add");
  if (picker) {
    if (picker.value) addSource(toInt(picker.dataset.slice, -1), picker.value);
    return;
  }
  if (e.target.closest(".fs-blend-method")) {
    const method = e.target.value;
    const extra = { merge_method: method };
    if (factsOf(method).base === "required" && !v.base_model && v.slices.length) extra.base_model = v.slices[0].model;
    commit(adaptToMethod(v.slices, method, v.merge_method), extra);
    return;
  }
  if (e.target.closest(".fs-blend-base")) {
    commit(v.slices, { base_model: e.target.value || null });
    return;
  }
  const weight = e.target.closest(".fs-weight input");
  if (!weight) return;
  const i = toInt(weight.dataset.slice, -1);
  const s = v.slices[i];
  const x = Number.parseFloat(weight.value);
  if (!s || !Number.isFinite(x)) return;
  const slices = v.slices.slice();
  if (weight.dataset.source === undefined) {
    slices[i] = { ...s, slice_parameters: { ...(s.slice_parameters || {}), t: x } };
  } else {
    const sources = sourcesOf(s);
    const j = toInt(weight.dataset.source, -1);
    if (j < 0 || j >= sources.length) return;
    sources[j] = { ...sources[j], parameters: { ...(sources[j].parameters || {}), weight: x } };
    slices[i] = withSources(s, sources);
  }
  commit(slices);
});

// Repeat: commit on "change" (spinner click, Enter, blur), not on every keystroke.
element.addEventListener("change", (e) => {
  const input = e.target.closest(".fs-rep input");
  if (!input) return;
  const i = toInt(input.dataset.slice, -1);
  const slices = current().slices.slice();
  if (i < 0 || i >= slices.length) return;
  const k = Math.min(MAX_REPEAT, Math.max(1, toInt(input.value, 1)));
  if (k === toInt(slices[i].repeat, 1)) {
    input.value = String(k);
    return;
  }
  slices[i] = { ...slices[i], repeat: k };
  commit(slices);
});

element.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && e.target.closest(".fs-rep input, .fs-weight input")) e.target.blur();
});

// Reorder: HTML5 drag-and-drop. Dropping on the upper half of a block inserts before it, lower half after.
function dropSide(block, e) {
  const r = block.getBoundingClientRect();
  return e.clientY < r.top + r.height / 2 ? "before" : "after";
}

function clearDropMarks() {
  root.querySelectorAll(".drop-before, .drop-after").forEach((el) => el.classList.remove("drop-before", "drop-after"));
}

element.addEventListener("dragstart", (e) => {
  const block = e.target.closest && e.target.closest(".fs-slice");
  if (!block || e.target.closest("input, select")) return;
  dragSlice = toInt(block.dataset.slice, null);
  e.dataTransfer.effectAllowed = "move";
  e.dataTransfer.setData("text/plain", String(dragSlice));
  block.classList.add("dragging");
});

element.addEventListener("dragover", (e) => {
  const block = e.target.closest && e.target.closest(".fs-slice");
  if (!block || dragSlice === null) return;
  e.preventDefault(); // allow the drop
  e.dataTransfer.dropEffect = "move";
  clearDropMarks();
  block.classList.add(dropSide(block, e) === "before" ? "drop-before" : "drop-after");
});

element.addEventListener("dragleave", (e) => {
  if (!element.contains(e.relatedTarget)) clearDropMarks();
});

element.addEventListener("drop", (e) => {
  const block = e.target.closest && e.target.closest(".fs-slice");
  if (!block || dragSlice === null) return;
  e.preventDefault();
  const from = dragSlice;
  const target = toInt(block.dataset.slice, from);
  let to = dropSide(block, e) === "before" ? target : target + 1;
  dragSlice = null;
  clearDropMarks();
  const slices = current().slices.slice();
  if (from < 0 || from >= slices.length) return;
  const [moved] = slices.splice(from, 1);
  if (to > from) to -= 1;
  slices.splice(to, 0, moved);
  if (to === from) {
    render();
    return;
  }
  commit(slices);
});

element.addEventListener("dragend", () => {
  dragSlice = null;
  clearDropMarks();
  root.querySelectorAll(".fs-slice.dragging").forEach((el) => el.classList.remove("dragging"));
});

// Python sent a new value: redraw (the static html_template itself never changes).
watch("value", render);
render();
