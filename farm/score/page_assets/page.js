/* sdfarm results page: lays out window.SDFARM (data.js, written by farm.score.page) as a grid.
 *
 * Any axis can be rows or columns; every other axis that varies picks a page (or "All", which
 * stacks its values as sections). The grid is built once per layout change into a
 * DocumentFragment; the thumbnail size is a CSS variable, so resizing never rebuilds it.
 * Everything is read from the page's own files: it works from file:// and published as is.
 * User text (prompts, labels, errors) only ever goes through textContent.
 */
"use strict";

(function () {
  const D = window.SDFARM;
  const $ = (id) => document.getElementById(id);
  const ALL = -1; // a page axis shown stacked: one section per value
  const NO_AXIS = -1; // rows or columns not split by any axis

  if (!D) {
    $("grid").textContent = "data.js is missing: run `farm page RUN` again.";
    return;
  }

  // ---- data -----------------------------------------------------------------------------------

  const axes = D.axes;
  const nAxes = axes.length;
  const images = D.images.map(decodeImage);
  const cells = D.cells;
  const byKey = new Map(cells.map((cell, i) => [cell.slice(1).join(","), i]));
  const sweeps = D.sweeps.map((sweep) => sweep.map((values) => new Set(values)));
  const varying = axes.map((_, a) => a).filter((a) => axes[a].values.length > 1);
  const scoreByKey = new Map(D.scores.map((s) => [s.key, s]));

  /** An image record as an object, its string-table indices resolved. */
  function decodeImage(record) {
    const image = {};
    D.imageFields.forEach((field, i) => { image[field] = record[i]; });
    for (const field of ["prompt", "negative", "sampler", "scheduler", "model", "lora", "error"]) {
      image[field] = D.strings[image[field]];
    }
    image.params = image.params.map((line) => line.map((i) => D.strings[i]).join(", ")).join("\n");
    return image;
  }

  /** Whether some table (sweep) of the job plans a cell with these axis values (undefined: any). */
  function planned(assign) {
    if (!sweeps.length) return true;
    return sweeps.some((sweep) => assign.every((v, a) => v === undefined || sweep[a].has(v)));
  }

  function withValue(assign, axis, value) {
    const copy = assign.slice();
    if (axis !== NO_AXIS) copy[axis] = value;
    return copy;
  }

  function product(lists) {
    return lists.reduce((combos, list) => combos.flatMap((c) => list.map((v) => c.concat([v]))), [[]]);
  }

  // ---- state (mirrored in the URL hash, so a view can be linked) -------------------------------

  const state = {
    rows: varying.length > 1 ? varying[0] : NO_AXIS,
    cols: varying.length > 1 ? varying[1] : (varying.length ? varying[0] : NO_AXIS),
    page: axes.map(() => 0),
    hidden: axes.map(() => new Set()),
    size: defaultSize(),
    heat: "",
    view: "grid",
  };

  function defaultSize() {
    const widths = images.filter((i) => i.w).map((i) => i.w).sort((a, b) => a - b);
    const median = widths.length ? widths[widths.length >> 1] : 160;
    return Math.round(Math.min(192, Math.max(96, median)) / 8) * 8;
  }

  function visible(axis) {
    return axes[axis].values.map((_, v) => v).filter((v) => !state.hidden[axis].has(v));
  }

  function freeAxes() {
    return varying.filter((a) => a !== state.rows && a !== state.cols);
  }

  function axisIndex(name) {
    return axes.findIndex((axis) => axis.name === name);
  }

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const axisParam = (key) => {
      if (!params.has(key)) return undefined;
      const a = axisIndex(params.get(key));
      return a >= 0 ? a : NO_AXIS;
    };
    const rows = axisParam("rows");
    const cols = axisParam("cols");
    if (rows !== undefined) state.rows = rows;
    if (cols !== undefined) state.cols = cols;
    if (state.rows === state.cols && state.rows !== NO_AXIS) state.cols = NO_AXIS;
    axes.forEach((axis, a) => {
      const page = params.get("p." + axis.name);
      if (page === "*") state.page[a] = ALL;
      else if (page !== null && axis.values[+page] !== undefined) state.page[a] = +page;
      const hidden = params.get("h." + axis.name);
      state.hidden[a] = new Set();
      if (hidden) hidden.split(",").map(Number).filter((v) => axis.values[v] !== undefined)
        .forEach((v) => state.hidden[a].add(v));
    });
    const size = +params.get("size");
    if (size >= 48 && size <= 512) state.size = size;
    state.heat = scoreByKey.has(params.get("heat")) ? params.get("heat") : "";
    state.view = params.get("view") === "report" && D.report ? "report" : "grid";
  }

  function writeHash() {
    const params = new URLSearchParams();
    const name = (a) => (a === NO_AXIS ? "-" : axes[a].name);
    params.set("rows", name(state.rows));
    params.set("cols", name(state.cols));
    for (const a of freeAxes()) params.set("p." + axes[a].name, state.page[a] === ALL ? "*" : state.page[a]);
    axes.forEach((axis, a) => {
      if (state.hidden[a].size) params.set("h." + axis.name, [...state.hidden[a]].sort((x, y) => x - y).join(","));
    });
    params.set("size", state.size);
    if (state.heat) params.set("heat", state.heat);
    if (state.view !== "grid") params.set("view", state.view);
    try {
      history.replaceState(null, "", "#" + params.toString());
    } catch (err) {
      /* some browsers refuse history on file://: the view just is not linkable there */
    }
  }

  // ---- layout -----------------------------------------------------------------------------------

  let layout = { matrix: [], cellEls: [], sections: 0, combos: [], paged: [], at: -1 };
  let layoutCount = 0;

  /** Fixed values (non-varying axes, the paged axes' current values), the stacked axes. */
  function pageAssignment() {
    const base = new Array(nAxes).fill(undefined);
    axes.forEach((axis, a) => {
      if (axis.values.length === 1 && a !== state.rows && a !== state.cols) base[a] = 0;
    });
    const stacked = [];
    for (const a of freeAxes()) {
      const shown = visible(a);
      if (state.page[a] === ALL) {
        stacked.push(a);
      } else {
        if (!shown.includes(state.page[a]) && shown.length) state.page[a] = shown[0];
        base[a] = state.page[a];
      }
    }
    return { base, stacked };
  }

  /** Every page (combination of the paged axes' visible values) that some table plans. */
  function pageCombos(base, stacked) {
    const paged = freeAxes().filter((a) => !stacked.includes(a));
    const fixed = base.map((v, a) => (paged.includes(a) ? undefined : v));
    const combos = product(paged.map(visible)).filter((combo) => {
      const assign = fixed.slice();
      paged.forEach((a, i) => { assign[a] = combo[i]; });
      return planned(assign);
    });
    const at = combos.findIndex((combo) => paged.every((a, i) => base[a] === combo[i]));
    return { paged, combos, at };
  }

  /** Move to the planned page closest to the chosen values: the axis just changed counts most,
   * then the page axes already on screen (a newly paged axis holds a stale value). */
  function snapPage(pages, changed) {
    if (pages.at >= 0 || !pages.combos.length) return false;
    const weight = (a) => (a === changed ? 4 * nAxes : (layout.paged.includes(a) ? 2 : 1));
    const closeness = (combo) => pages.paged.reduce((sum, a, i) =>
      sum + (combo[i] === state.page[a] ? weight(a) : 0), 0);
    let best = pages.combos[0];
    for (const combo of pages.combos) if (closeness(combo) > closeness(best)) best = combo;
    pages.paged.forEach((a, i) => { state.page[a] = best[i]; });
    return true;
  }

  function sectionsOf(base, stacked) {
    return product(stacked.map(visible))
      .map((combo) => {
        const assign = base.slice();
        stacked.forEach((a, i) => { assign[a] = combo[i]; });
        return assign;
      })
      .filter(planned)
      .map((assign) => ({
        assign,
        rows: state.rows === NO_AXIS ? [null] : visible(state.rows).filter((v) => planned(withValue(assign, state.rows, v))),
        cols: state.cols === NO_AXIS ? [null] : visible(state.cols).filter((v) => planned(withValue(assign, state.cols, v))),
      }))
      .filter((section) => section.rows.length && section.cols.length);
  }

  /** Lay the grid out again. `changed`: the page axis the user just set, kept when the page must
   * move to a combination some table plans (two tables rarely share every axis). */
  function relayout(changed) {
    const started = performance.now();
    let { base, stacked } = pageAssignment();
    let pages = pageCombos(base, stacked);
    if (snapPage(pages, changed)) {
      ({ base, stacked } = pageAssignment());
      pages = pageCombos(base, stacked);
    }
    const sections = sectionsOf(base, stacked);
    const heat = heatScale();
    const fragment = document.createDocumentFragment();
    const matrix = [];
    const cellEls = [];
    for (const section of sections) {
      fragment.appendChild(buildSection(section, stacked, matrix, cellEls, heat));
    }
    if (!sections.length) fragment.appendChild(emptyMessage());
    const grid = $("grid");
    grid.classList.toggle("stacked", stacked.length > 0);
    grid.style.setProperty("--label-w", `${labelWidth()}px`);
    grid.style.setProperty("--aspect", String(typicalShape().h / typicalShape().w));
    grid.replaceChildren(fragment);
    layout = { matrix, cellEls, sections: sections.length, combos: pages.combos, paged: pages.paged, at: pages.at };
    syncControls();
    writeHash();
    layoutCount += 1;
    document.body.dataset.layout = String(layoutCount);
    document.body.dataset.cells = String(cellEls.length);
    document.body.dataset.layoutMs = (performance.now() - started).toFixed(1);
  }

  /** The row label column: as wide as the longest label needs, up to a limit (long ones wrap). */
  function labelWidth() {
    if (state.rows === NO_AXIS) return 0;
    const corner = Math.max(axes[state.rows].name.length, state.cols === NO_AXIS ? 0 : axes[state.cols].name.length) + 2;
    const longest = Math.max(corner, ...visible(state.rows).map((v) => axes[state.rows].values[v].length));
    return Math.round(Math.min(220, Math.max(64, longest * 7.2 + 18)));
  }

  function emptyMessage() {
    const p = el("p", "empty");
    p.textContent = "Nothing to show: the filters hide every cell of this page.";
    return p;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function valueLabel(axis, value) {
    return axis === NO_AXIS || value === null ? "" : axes[axis].values[value];
  }

  function buildSection(section, stacked, matrix, cellEls, heat) {
    const node = el("section", "section");
    node.style.setProperty("--rows", String(section.rows.length));
    if (stacked.length) node.appendChild(sectionTitle(section.assign, stacked));
    const hasRowHead = state.rows !== NO_AXIS;
    const hasColHead = state.cols !== NO_AXIS;
    const grid = el("div", "grid");
    grid.style.gridTemplateColumns = (hasRowHead ? "var(--label-w) " : "") + `repeat(${section.cols.length}, var(--thumb))`;
    if (hasColHead) {
      if (hasRowHead) grid.appendChild(corner());
      for (const c of section.cols) grid.appendChild(header("colhead", state.cols, c));
    }
    for (const r of section.rows) {
      if (hasRowHead) grid.appendChild(header("rowhead", state.rows, r));
      const row = [];
      const assign = withValue(section.assign, state.rows, r);
      section.cols.forEach((c, ci) => {
        const full = withValue(assign, state.cols, c);
        const cellIndex = byKey.get(full.join(","));
        const node = cellElement(cellIndex, full, matrix.length, ci, heat);
        if (cellIndex !== undefined) cellEls.push(node);
        row.push(cellIndex === undefined ? null : cellIndex);
        grid.appendChild(node);
      });
      matrix.push(row);
    }
    node.appendChild(grid);
    return node;
  }

  function sectionTitle(assign, stacked) {
    const title = el("h2", "section-title");
    for (const a of stacked) {
      const pair = el("span", "pair");
      pair.append(el("span", "k", axes[a].name), el("span", "v", axes[a].values[assign[a]]));
      pair.title = `${axes[a].name}: ${axes[a].values[assign[a]]}`;
      title.appendChild(pair);
    }
    return title;
  }

  function corner() {
    const node = el("div", "corner");
    node.append(el("span", "corner-rows", `${axes[state.rows].name} ↓`), el("span", "corner-cols", `${axes[state.cols].name} →`));
    return node;
  }

  function header(className, axis, value) {
    const node = el("div", className);
    const text = el("span", "label", valueLabel(axis, value));
    node.title = `${axes[axis].name}: ${valueLabel(axis, value)}`;
    node.dataset.value = valueLabel(axis, value);
    node.appendChild(text);
    return node;
  }

  /** A cell: the image at its own aspect ratio, or a marked placeholder (failed, missing,
   * not rendered yet); a position no table plans stays blank. */
  function cellElement(cellIndex, assign, r, c, heat) {
    const node = cellIndex === undefined ? emptyCell(assign) : imageCell(cellIndex);
    node.dataset.r = r;
    node.dataset.c = c;
    if (cellIndex !== undefined) paintHeat(node, images[cells[cellIndex][0]], heat);
    return node;
  }

  function emptyCell(assign) {
    const node = el("div", "cell");
    if (assign.every((v) => v !== undefined) && planned(assign)) {
      node.classList.add("missing");
      node.dataset.status = "not-rendered";
      node.appendChild(placeholder(typicalShape(), "not rendered", ""));
    } else {
      node.classList.add("void");
    }
    return node;
  }

  // A cell's element is made once and moved between layouts: a new <img> for an image the
  // browser has cached loads at once, lazy or not, which made every re-layout cost a cache lookup
  // per image.
  const cellNodes = new Map();

  function imageCell(cellIndex) {
    let node = cellNodes.get(cellIndex);
    if (node) {
      node.classList.remove("current");
      return node;
    }
    const image = images[cells[cellIndex][0]];
    node = el("div", "cell");
    node.dataset.task = image.task;
    node.dataset.cell = cellIndex;
    node.dataset.status = image.status;
    node.title = cellCaption(cellIndex);
    if (image.status === "ok") {
      const img = document.createElement("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.width = image.w;
      img.height = image.h;
      img.alt = node.title;
      img.src = image.src;
      node.appendChild(img);
    } else {
      node.classList.add("failed");
      node.appendChild(placeholder(image, image.status === "missing" ? "image missing" : "failed", image.error));
    }
    cellNodes.set(cellIndex, node);
    return node;
  }

  let shape = null;
  function typicalShape() {
    if (!shape) {
      const sized = images.find((i) => i.w && i.h);
      shape = sized ? { w: sized.w, h: sized.h } : { w: 1, h: 1 };
    }
    return shape;
  }

  function placeholder(size, label, detail) {
    const box = el("div", "ph");
    box.style.aspectRatio = `${size.w || 1} / ${size.h || 1}`;
    box.appendChild(el("span", "ph-label", label));
    if (detail) box.appendChild(el("span", "ph-detail", detail));
    return box;
  }

  function cellCaption(cellIndex) {
    const values = cells[cellIndex];
    return varying.map((a) => `${axes[a].name}: ${axes[a].values[values[a + 1]]}`).join(" · ");
  }

  // ---- heat map ---------------------------------------------------------------------------------

  function heatScale() {
    const score = scoreByKey.get(state.heat);
    if (!score) return null;
    const values = images.map((i) => i.scores[score.column]).filter((v) => v !== null && v !== undefined);
    if (!values.length) return null;
    return { score, min: Math.min(...values), max: Math.max(...values) };
  }

  /** Tint a cell by its image's score (red: worse, green: better) and print the value; a cell
   * without the score keeps no tint. */
  function paintHeat(node, image, heat) {
    const old = node.querySelector(".badge");
    if (old) old.remove();
    const value = heat ? image.scores[heat.score.column] : null;
    if (value === null || value === undefined) {
      node.classList.remove("heat");
      node.style.removeProperty("--heat");
      delete node.dataset.heat;
      return;
    }
    let t = heat.max > heat.min ? (value - heat.min) / (heat.max - heat.min) : 0.5;
    if (heat.score.better === "lower") t = 1 - t;
    node.classList.add("heat");
    node.style.setProperty("--heat", `hsl(${Math.round(t * 120)} 80% 42%)`);
    node.dataset.heat = String(value);
    node.appendChild(el("span", "badge", formatScore(value)));
  }

  function applyHeat() {
    const heat = heatScale();
    for (const node of layout.cellEls) paintHeat(node, images[cells[+node.dataset.cell][0]], heat);
    showLegend(heat);
    writeHash();
  }

  function showLegend(heat) {
    $("legend").hidden = !heat;
    if (!heat) return;
    const lowBetter = heat.score.better === "lower";
    $("legend").classList.toggle("low-better", lowBetter);
    $("legend-low").textContent = formatScore(heat.min);
    $("legend-high").textContent = formatScore(heat.max);
    $("legend").title = `${heat.score.label}: ${lowBetter ? "lower" : "higher"} is better (green)`;
  }

  function formatScore(value) {
    if (value === null || value === undefined) return "–";
    return Number.isInteger(value) ? String(value) : value.toFixed(3);
  }

  // ---- controls ---------------------------------------------------------------------------------

  function option(value, text) {
    const node = document.createElement("option");
    node.value = String(value);
    node.textContent = text;
    return node;
  }

  function fillAxisSelect(select) {
    select.replaceChildren(option(NO_AXIS, "(none)"), ...axes.map((axis, a) =>
      option(a, `${axis.name} (${axis.values.length})`)));
  }

  function syncControls() {
    $("rows").value = String(state.rows);
    $("cols").value = String(state.cols);
    buildPageSelects();
    const { combos, at } = layout;
    $("pages").hidden = freeAxes().length === 0;
    $("page-info").textContent = combos.length > 1 && at >= 0 ? `${at + 1} / ${combos.length}` : "";
    $("prev-page").disabled = !(combos.length > 1 && at >= 0);
    $("next-page").disabled = !(combos.length > 1 && at >= 0);
    $("view-info").textContent = `${layout.cellEls.length.toLocaleString()} cells` +
      (layout.sections > 1 ? ` · ${layout.sections} sections` : "");
    $("size").value = String(state.size);
    $("heat").value = state.heat;
    const hidden = state.hidden.reduce((n, set) => n + set.size, 0);
    $("filter-count").textContent = hidden ? String(hidden) : "";
  }

  function buildPageSelects() {
    const fragment = document.createDocumentFragment();
    for (const a of freeAxes()) {
      const label = el("label", "control");
      label.appendChild(el("span", "", axes[a].name));
      const select = document.createElement("select");
      select.className = "page-select";
      select.dataset.axis = axes[a].name;
      for (const v of visible(a)) select.appendChild(option(v, axes[a].values[v]));
      select.appendChild(option(ALL, "All (stacked)"));
      select.value = String(state.page[a]);
      select.addEventListener("change", () => {
        state.page[a] = +select.value;
        relayout(a);
      });
      label.appendChild(select);
      fragment.appendChild(label);
    }
    $("page-selects").replaceChildren(fragment);
  }

  function stepPage(delta) {
    const { combos, at, paged } = layout;
    if (combos.length < 2 || at < 0) return;
    const next = combos[(at + delta + combos.length) % combos.length];
    paged.forEach((a, i) => { state.page[a] = next[i]; });
    relayout();
    $("main").scrollTo({ top: 0 });
  }

  function setAxis(which, value) {
    const other = which === "rows" ? "cols" : "rows";
    if (value !== NO_AXIS && state[other] === value) state[other] = state[which];
    state[which] = value;
    relayout();
  }

  function buildFilters() {
    const fragment = document.createDocumentFragment();
    for (const a of varying) {
      const set = el("fieldset", "filter");
      set.dataset.axis = axes[a].name;
      const legend = el("legend");
      legend.append(el("span", "", axes[a].name));
      const all = el("button", "link", "all");
      const none = el("button", "link", "none");
      all.type = none.type = "button";
      all.addEventListener("click", () => setHidden(a, []));
      none.addEventListener("click", () => setHidden(a, axes[a].values.map((_, v) => v)));
      legend.append(all, none);
      set.appendChild(legend);
      const list = el("div", "filter-values");
      axes[a].values.forEach((value, v) => {
        const label = el("label", "check");
        label.title = value;
        const box = document.createElement("input");
        box.type = "checkbox";
        box.dataset.axis = axes[a].name;
        box.dataset.value = value;
        box.checked = !state.hidden[a].has(v);
        box.addEventListener("change", () => {
          if (box.checked) state.hidden[a].delete(v); else state.hidden[a].add(v);
          relayout();
        });
        label.append(box, el("span", "", value));
        list.appendChild(label);
      });
      set.appendChild(list);
      fragment.appendChild(set);
    }
    if (!varying.length) fragment.appendChild(el("p", "muted", "No axis varies in this run."));
    $("filters").replaceChildren(fragment);
  }

  function setHidden(axis, values) {
    state.hidden[axis] = new Set(values);
    for (const box of $("filters").querySelectorAll(`input[data-axis="${CSS.escape(axes[axis].name)}"]`)) {
      box.checked = !state.hidden[axis].has(axes[axis].values.indexOf(box.dataset.value));
    }
    relayout();
  }

  function buildHeatSelect() {
    const select = $("heat");
    select.replaceChildren(option("", D.scores.length ? "off" : "no scores"));
    for (const score of D.scores) {
      select.appendChild(option(score.key, `${score.label} ${score.better === "lower" ? "↓" : "↑"}`));
    }
    select.disabled = !D.scores.length;
  }

  function setView(view) {
    state.view = view;
    $("grid").hidden = view !== "grid";
    $("report").hidden = view !== "report";
    $("toolbar").hidden = view !== "grid";
    if (view !== "grid") $("filters").hidden = true;
    for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", String(tab.dataset.view === view));
    writeHash();
  }

  function bindControls() {
    fillAxisSelect($("rows"));
    fillAxisSelect($("cols"));
    buildHeatSelect();
    buildFilters();
    $("rows").addEventListener("change", () => setAxis("rows", +$("rows").value));
    $("cols").addEventListener("change", () => setAxis("cols", +$("cols").value));
    $("swap").addEventListener("click", () => {
      [state.rows, state.cols] = [state.cols, state.rows];
      relayout();
    });
    $("prev-page").addEventListener("click", () => stepPage(-1));
    $("next-page").addEventListener("click", () => stepPage(1));
    $("size").addEventListener("input", () => {
      state.size = +$("size").value;
      applySize();
    });
    $("size").addEventListener("change", writeHash);
    $("heat").addEventListener("change", () => {
      state.heat = $("heat").value;
      applyHeat();
    });
    $("filters-toggle").addEventListener("click", () => {
      const open = $("filters").hidden;
      $("filters").hidden = !open;
      $("filters-toggle").setAttribute("aria-expanded", String(open));
    });
    for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => setView(tab.dataset.view));
    $("grid").addEventListener("click", (event) => {
      const node = event.target.closest(".cell[data-cell]");
      if (node) openViewer(+node.dataset.r, +node.dataset.c);
    });
    document.addEventListener("keydown", onKey);
    $("viewer").addEventListener("click", (event) => {
      if (event.target.closest("[data-close]")) closeViewer();
    });
    $("viewer-copy").addEventListener("click", copyParams);
    window.addEventListener("hashchange", () => { // a pasted or edited link: show its view
      readHash();
      buildFilters();
      applySize();
      relayout();
      applyHeat();
      setView(state.view);
    });
  }

  function applySize() {
    document.documentElement.style.setProperty("--thumb", `${state.size}px`);
  }

  // ---- viewer -----------------------------------------------------------------------------------

  const viewer = { r: -1, c: -1, returnFocus: null };

  function openViewer(r, c) {
    const cellIndex = (layout.matrix[r] || [])[c];
    if (cellIndex === null || cellIndex === undefined) return;
    if ($("viewer").hidden) viewer.returnFocus = document.activeElement;
    viewer.r = r;
    viewer.c = c;
    showImage(cellIndex);
    $("viewer").hidden = false;
    document.body.classList.add("viewing");
    $("viewer-panel").focus({ preventScroll: true });
    for (const node of document.querySelectorAll(".cell.current")) node.classList.remove("current");
    const node = $("grid").querySelector(`.cell[data-r="${r}"][data-c="${c}"]`);
    if (node) {
      node.classList.add("current");
      node.scrollIntoView({ block: "nearest", inline: "nearest" });
    }
  }

  function closeViewer() {
    $("viewer").hidden = true;
    document.body.classList.remove("viewing");
    $("viewer-img").removeAttribute("src");
    if (viewer.returnFocus && viewer.returnFocus.focus) viewer.returnFocus.focus({ preventScroll: true });
  }

  function showImage(cellIndex) {
    const image = images[cells[cellIndex][0]];
    const img = $("viewer-img");
    const ok = image.status === "ok";
    img.hidden = !ok;
    $("viewer-placeholder").hidden = ok;
    if (ok) {
      img.src = image.src;
      img.width = image.w;
      img.height = image.h;
      img.alt = cellCaption(cellIndex);
    } else {
      img.removeAttribute("src");
      $("viewer-placeholder").replaceChildren(el("strong", "", image.status === "missing" ? "Image missing" : "Render failed"),
        el("span", "", image.error || ""));
    }
    $("viewer-title").textContent = cellCaption(cellIndex) || image.task.slice(0, 12);
    fillFields(image);
    fillScores(image);
    $("viewer-params").textContent = image.params || (ok ? "(this PNG holds no parameters text)" : image.error || "");
    $("viewer-task").textContent = image.task;
    const open = $("viewer-open");
    open.hidden = !ok;
    if (ok) open.href = image.src;
    $("viewer").dataset.task = image.task;
  }

  function definitionList(target, pairs) {
    const fragment = document.createDocumentFragment();
    for (const [name, value] of pairs) {
      if (value === null || value === undefined || value === "") continue;
      fragment.append(el("dt", "", name), el("dd", "", String(value)));
    }
    target.replaceChildren(fragment);
  }

  function fillFields(image) {
    definitionList($("viewer-fields"), [
      ["Status", image.status === "ok" ? "" : image.status],
      ["Prompt", image.prompt], ["Negative", image.negative], ["Seed", image.seed], ["Steps", image.steps],
      ["CFG", image.cfg], ["Sampler", image.sampler], ["Schedule", image.scheduler],
      ["Size", image.w && image.h ? `${image.w}×${image.h}` : ""], ["Model", image.model],
      ["LoRA", image.lora ? `${image.lora} @ ${image.strength}` : "none"],
    ]);
  }

  function fillScores(image) {
    const pairs = D.scores.map((s) => [s.label, formatScore(image.scores[s.column])]);
    if (image.faces !== null && image.faces !== undefined) pairs.push(["Faces found", image.faces]);
    if (image.subject !== null && image.subject !== undefined) {
      pairs.push(["Prompt names subject", image.subject ? "yes" : "no (class only)"]);
    }
    const scored = D.scores.some((s) => image.scores[s.column] !== null) || image.faces !== null;
    definitionList($("viewer-scores"), scored ? pairs : (D.scores.length ? [["Scores", "not scored"]] : []));
  }

  /** The next cell with an image (or a failed render) from (r, c) in a direction; gaps skipped. */
  function neighbour(dr, dc) {
    let r = viewer.r;
    let c = viewer.c;
    for (;;) {
      r += dr;
      c += dc;
      const row = layout.matrix[r];
      if (!row || c < 0) return null;
      const col = dr ? Math.min(c, row.length - 1) : c;
      if (col >= row.length) return null;
      if (row[col] !== null && row[col] !== undefined) return [r, col];
    }
  }

  const MOVES = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };

  function onKey(event) {
    if (!$("viewer").hidden) {
      if (event.key === "Escape") {
        closeViewer();
        event.preventDefault();
      } else if (MOVES[event.key]) {
        const next = neighbour(...MOVES[event.key]);
        if (next) openViewer(...next);
        event.preventDefault();
      }
      return;
    }
    const typing = /^(INPUT|SELECT|TEXTAREA)$/.test((event.target && event.target.tagName) || "");
    // [ and ]: PageUp / PageDown stay the scroll keys of a tall grid
    if (!typing && state.view === "grid" && (event.key === "]" || event.key === "[")) {
      stepPage(event.key === "]" ? 1 : -1);
      event.preventDefault();
    }
  }

  async function copyParams() {
    const text = $("viewer-params").textContent;
    try {
      await navigator.clipboard.writeText(text);
      flash("Copied");
    } catch (err) {
      const range = document.createRange();
      range.selectNodeContents($("viewer-params"));
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      flash("Selected: press Ctrl+C");
    }
  }

  function flash(text) {
    const button = $("viewer-copy");
    button.textContent = text;
    setTimeout(() => { button.textContent = "Copy"; }, 1400);
  }

  // ---- header and report --------------------------------------------------------------------------

  function fillHeader() {
    document.title = `${D.job} · sdfarm results`;
    $("job").textContent = D.job;
    const failed = images.filter((i) => i.status !== "ok").length;
    const scored = images.filter((i) => i.scores.some((v) => v !== null)).length;
    const parts = [`${(images.length - failed).toLocaleString()} images`];
    if (failed) parts.push(`${failed.toLocaleString()} failed`);
    if (D.scores.length) parts.push(`${scored.toLocaleString()} scored`);
    parts.push(`generated ${D.generated}`);
    $("summary").textContent = parts.join(" · ");
    const common = document.createDocumentFragment();
    for (const [name, value] of D.common) {
      const chip = el("span", "chip");
      chip.title = `${name}: ${value}`;
      chip.append(el("span", "k", name), el("span", "v", value));
      common.appendChild(chip);
    }
    axes.forEach((axis) => {
      if (axis.values.length === 1 && axis.values[0] !== "-") {
        const chip = el("span", "chip");
        chip.append(el("span", "k", axis.name), el("span", "v", axis.values[0]));
        common.appendChild(chip);
      }
    });
    $("common").replaceChildren(common);
  }

  function spread(value) {
    if (!value || value.mean === null || value.mean === undefined) return "–";
    return `${value.mean.toFixed(3)} ± ${(value.std || 0).toFixed(3)} (${value.n})`;
  }

  function renderReport(report) {
    $("tab-report").hidden = false;
    const root = $("report");
    const fragment = document.createDocumentFragment();
    fragment.appendChild(el("h2", "", "Report"));
    if (report.error) {
      fragment.appendChild(el("p", "error", report.error));
      root.replaceChildren(fragment);
      return;
    }
    const facts = [];
    if (report.images !== undefined) facts.push(`${report.images} images`);
    if (report.unscored) facts.push(`${report.unscored} not scored`);
    if (report.strength !== undefined && report.strength !== null) facts.push(`checkpoints compared at strength ${report.strength}`);
    if (facts.length) fragment.appendChild(el("p", "muted", facts.join(" · ")));
    const rule = el("p", "rule");
    rule.id = "report-rule";
    rule.append(el("strong", "", "Rule: "), document.createTextNode(report.rule || "–"));
    const best = el("p", "headline");
    best.id = "report-best";
    best.append(el("strong", "", "Best: "), document.createTextNode(report.best ?
      `${report.best.label} (variant ${report.best.variant})` : "none"));
    fragment.append(best, rule, reportTable(report));
    fragment.appendChild(el("p", "muted", "Cells: mean ± spread (images). Likeness and leakage are dlib face " +
      "distances to the subject photos (below 0.6: the same person)."));
    fragment.appendChild(reportPlots(report.plots || []));
    root.replaceChildren(fragment);
  }

  function reportTable(report) {
    const wrap = el("div", "table-wrap");
    const table = el("table", "report-table");
    table.id = "report-table";
    const head = el("tr");
    for (const name of ["Rank", "Checkpoint", "Variant", "Images", "Likeness ↓", "Faces found", "Leakage ↑",
      "CLIP-T ↑", "CLIP-I ↑", "Notes"]) head.appendChild(el("th", "", name));
    table.appendChild(el("thead")).appendChild(head);
    const body = el("tbody");
    const rows = (report.baseline ? [Object.assign({ baseline: true }, report.baseline)] : []).concat(report.checkpoints || []);
    for (const c of rows) {
      const tr = el("tr");
      if (c.baseline) tr.className = "baseline";
      if (report.best && c.label === report.best.label && c.variant === report.best.variant) tr.className = "best";
      if (c.eligible === false) tr.classList.add("ineligible");
      const rate = c.face_rate === null || c.face_rate === undefined ? "–" : `${Math.round(c.face_rate * 100)}%`;
      for (const text of [c.rank || "", c.label, c.variant, c.images, spread(c.likeness), rate, spread(c.leakage),
        spread(c.clip_t), spread(c.clip_i), (c.notes || []).join("; ")]) {
        tr.appendChild(el("td", "", String(text === undefined || text === null ? "" : text)));
      }
      if (c.loss_plot) {
        const link = el("a", "", " loss curve");
        link.href = c.loss_plot;
        tr.lastChild.appendChild(link);
      }
      body.appendChild(tr);
    }
    table.appendChild(body);
    wrap.appendChild(table);
    return wrap;
  }

  const PLOT_TITLES = { likeness: "Likeness by epoch", clip_i: "CLIP-I by epoch", clip_t: "CLIP-T by epoch",
    scatter: "Likeness vs leakage" };

  function reportPlots(plots) {
    const box = el("div", "plots");
    box.id = "report-plots";
    for (const plot of plots) {
      const figure = el("figure", "plot");
      const caption = PLOT_TITLES[plot.name] || plot.name;
      const img = document.createElement("img");
      img.src = plot.src;
      img.alt = caption;
      img.loading = "lazy";
      const link = el("a");
      link.href = plot.src;
      link.appendChild(img);
      figure.append(link, el("figcaption", "", caption));
      box.appendChild(figure);
    }
    return box;
  }

  // ---- start ------------------------------------------------------------------------------------

  function start() {
    readHash();
    fillHeader();
    bindControls();
    applySize();
    showLegend(heatScale());
    if (D.report) renderReport(D.report);
    relayout();
    setView(state.view);
    document.body.dataset.readyMs = performance.now().toFixed(0);
    document.body.dataset.ready = "1";
  }

  start();
})();
