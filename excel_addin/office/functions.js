/*
 * The Office add-in's formulas: =EMBED_SIM, =SIM_MATRIX, =SEMANTIC_SEARCH, =EMBED,
 * =EMBED_INFO, with the same arguments and meaning as the xlwings ones
 * (excel_addin/udfs.py). A blank input gives a blank output and costs no request, an
 * error input gives #N/A in its place, and any failure is #VALUE! with one readable
 * sentence (Excel shows it in the cell's error menu). A range's trailing blank rows and
 * columns are left out: Excel hands a whole column (B:B) over as 1,048,576 rows.
 * functions.json describes them to Excel; a test keeps the two in step.
 */
(function (exports) {
  "use strict";

  const cells = typeof require === "function" ? require("./cells.js") : globalThis.SheetCells;
  const http = typeof require === "function" ? require("./client.js") : globalThis.SheetClient;
  const { BLANK, CellError, asGrid, cellText, flatten, shape } = cells;
  // A number as a cell shows it or one may type it (udfs.py's NUMBER).
  const NUMBER = /^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$/;

  const STORAGE_KEYS = { apiKey: "sheet-embeddings.api-key", instruction: "sheet-embeddings.instruction" };
  const settings = { serverUrl: defaultServerUrl(), apiKey: "", instruction: "" };
  let client = null;
  let loading = null; // the saved settings being read, once

  class InputError extends Error {}

  /** The service that serves this page: the API lives beside /excel/. */
  function defaultServerUrl() {
    const here = globalThis.location && globalThis.location.href;
    if (!here) return "";
    const at = here.indexOf("/excel/");
    return at >= 0 ? here.slice(0, at) : globalThis.location.origin;
  }

  /** The shared client; a new one (and cache) when the server or key changes. */
  function getClient() {
    if (client === null) client = new http.EmbedClient(settings);
    return client;
  }

  /** Settings for the formulas (the task pane and the tests call this). A change to
   * anything but the default instruction starts a new client, and so a new cache. */
  function configure(changes) {
    const renew = Object.entries(changes).some(([k, v]) => k !== "instruction" && settings[k] !== v);
    Object.assign(settings, changes);
    if (renew) client = null;
    return settings;
  }

  /** Settings saved by the task pane: OfficeRuntime.storage where Office offers it. */
  async function loadSettings() {
    const storage = globalThis.OfficeRuntime && globalThis.OfficeRuntime.storage;
    const read = async (key) => {
      if (storage) return storage.getItem(key);
      return globalThis.localStorage ? globalThis.localStorage.getItem(key) : null;
    };
    configure({
      apiKey: (await read(STORAGE_KEYS.apiKey)) || "",
      instruction: (await read(STORAGE_KEYS.instruction)) || "",
    });
  }

  /** The saved settings, read once: the formulas wait for them (one registered at load may
   * be calculated before the task pane opens), so none runs without the key or the
   * default instruction. Storage that cannot be read leaves the defaults. */
  function settingsReady() {
    if (loading === null) {
      loading = loadSettings().catch(() => {
        loading = null; // read again by the next caller (the task pane, once Office is ready)
      });
    }
    return loading;
  }

  function notAvailable() {
    return new CustomFunctions.Error(CustomFunctions.ErrorCode.notAvailable);
  }

  /** Any failure as #VALUE! with one sentence; never a stack trace. */
  function readable(name, fn) {
    return async function (...args) {
      try {
        await settingsReady();
        return await fn(...args);
      } catch (error) {
        let message;
        if (error instanceof http.ServiceError) message = error.message;
        else if (error instanceof InputError) message = `${name}: ${error.message}`;
        else message = `${name} failed unexpectedly (${error && error.name}: ${error && error.message}).`;
        throw new CustomFunctions.Error(CustomFunctions.ErrorCode.invalidValue, message);
      }
    };
  }

  /**
   * Cosine similarity of a and b; ranges give one score per cell pair, and one cell
   * compares with each.
   */
  async function embedSim(a, b, instruction) {
    const [left, right] = usedPair(asGrid(a), asGrid(b));
    const [rows, cols] = pairedShape(shape(left), shape(right));
    const lefts = broadcast(left, rows, cols).map((row) => row.map(cellText));
    const rights = broadcast(right, rows, cols).map((row) => row.map(cellText));
    const task = instructionOf(instruction);
    let queries;
    let documents;
    if (!task) {
      queries = documents = await vectorsOf(flatten(lefts).concat(flatten(rights)), "");
    } else {
      [queries, documents] = await Promise.all([
        vectorsOf(flatten(lefts), task), vectorsOf(flatten(rights), ""),
      ]);
    }
    return lefts.map((row, i) => row.map((cell, j) => score(cell, rights[i][j], queries, documents)));
  }

  /** All-pairs cosine similarity: one row per text of range1, one column per text of range2. */
  async function simMatrix(range1, range2, instruction) {
    const rows = flatten(used(asGrid(range1))).map(cellText);
    const cols = flatten(used(asGrid(range2))).map(cellText);
    const task = instructionOf(instruction);
    let rowVectors;
    let colVectors;
    if (!task) {
      rowVectors = colVectors = await vectorsOf(rows.concat(cols), "");
    } else {
      [rowVectors, colVectors] = await Promise.all([vectorsOf(rows, task), vectorsOf(cols, "")]);
    }
    return rows.map((r) => cols.map((c) => score(r, c, rowVectors, colVectors)));
  }

  /** The k candidates most similar to query, best first, as rows of (text, score). */
  async function semanticSearch(query, candidates, k, instruction) {
    const top = wholeNumber(k, "k", 1, 10000) || 5; // a blank k cell: 5
    const question = cellText(oneCell(query, "query"));
    if (question === BLANK) return [[""]];
    if (question instanceof CellError) return [[notAvailable()]];
    const texts = [...new Set(flatten(used(asGrid(candidates))).map(cellText))]
      .filter((t) => typeof t === "string");
    if (!texts.length) throw new InputError("the candidates range holds no text.");
    // Without an instruction, the query takes the model's own query prompt, as the batch
    // job's search does (Qwen3's; none for models without one, such as the bundled model).
    const [queryVectors, documents] = await Promise.all([
      vectorsOf([question], instructionOf(instruction), "query"), vectorsOf(texts, ""),
    ]);
    const target = queryVectors.get(question);
    const scored = texts.map((text, i) => [i, http.cosine(target, documents.get(text))]);
    scored.sort((x, y) => y[1] - x[1] || x[0] - y[0]); // best first; ties keep sheet order
    return scored.slice(0, top).map(([i, s]) => [texts[i], s]);
  }

  /** The embedding vector of each text, as a row of numbers. */
  async function embed(text, dimensions, instruction) {
    const width = wholeNumber(dimensions, "dimensions", 1, 100000);
    const values = flatten(used(asGrid(text))).map(cellText);
    const vectors = await vectorsOf(values, instructionOf(instruction));
    const sample = vectors.values().next().value;
    if (sample && width !== null) {
      // As the server checks `dimensions`: the cache holds full vectors, so a cut wider
      // than the model would silently give the full width.
      const low = getClient().minDimensions;
      if (width < low || width > sample.length) {
        throw new InputError(
          `dimensions must be between ${low} and ${sample.length} for ${getClient().modelName}, not ${width}.`);
      }
    }
    const size = sample ? http.truncate(sample, width).length : 1;
    return values.map((cell) => {
      if (cell === BLANK) return new Array(size).fill("");
      if (cell instanceof CellError) return new Array(size).fill(null).map(notAvailable);
      return Array.from(http.truncate(vectors.get(cell), width));
    });
  }

  /** The embedding server, model and dimension in use, or why it cannot be reached. */
  async function embedInfo() {
    const info = await getClient().info();
    const where = settings.serverUrl || (globalThis.location ? globalThis.location.origin : "");
    const reads = info.maxInputTokens ? ` · reads ${info.maxInputTokens.toLocaleString("en-US")} tokens of a cell` : "";
    return `${where} · ${info.model} · ${info.dimensions} dimensions${reads}`;
  }

  // --- helpers ----------------------------------------------------------------------

  function instructionOf(instruction) {
    const text = instruction === null || instruction === undefined ? BLANK
      : cellText(oneCell(instruction, "instruction"));
    if (text instanceof CellError) throw new InputError(`the instruction cell holds ${text.text}.`);
    return typeof text === "string" ? text : settings.instruction || "";
  }

  async function vectorsOf(values, task, promptName) {
    const wanted = values.filter((v) => typeof v === "string");
    if (!wanted.length) return new Map();
    return getClient().vectors(wanted, task, promptName);
  }

  function score(a, b, left, right) {
    if (a instanceof CellError || b instanceof CellError) return notAvailable();
    if (a === BLANK || b === BLANK) return "";
    return http.cosine(left.get(a), right.get(b));
  }

  function pairedShape(a, b) {
    const same = (x, y) => x[0] === y[0] && x[1] === y[1];
    if (same(a, b) || same(b, [1, 1])) return a;
    if (same(a, [1, 1])) return b;
    throw new InputError(
      `a and b must have the same shape, or one must be a single cell; got ${a[0]}x${a[1]} and ${b[0]}x${b[1]}.`);
  }

  function broadcast(grid, rows, cols) {
    const [r, c] = shape(grid);
    if (r === rows && c === cols) return grid;
    return Array.from({ length: rows }, () => new Array(cols).fill(grid[0][0]));
  }

  /** The value of an argument that takes one cell (functions.json declares it scalar, so
   * Excel refuses a range; udfs.py's _one_cell). A one-cell range is that cell. */
  function oneCell(value, name) {
    if (!Array.isArray(value)) return value;
    const values = flatten(asGrid(value));
    if (values.length !== 1) throw new InputError(`${name} must be one cell, not a range.`);
    return values[0];
  }

  /** `grid` without its trailing blank rows and columns (one cell at least); blanks inside
   * the used part keep their place (udfs.py's _used). */
  function used(grid) {
    const [rows, cols] = extent(grid);
    return grid.slice(0, rows).map((row) => row.slice(0, cols));
  }

  /** EMBED_SIM's two ranges without the trailing rows and columns blank in both; a single
   * cell against a range, the range as `used` leaves it. Ranges of two other shapes stay as
   * they are, for `pairedShape` to refuse (trimmed, a mostly blank one could pass for a cell). */
  function usedPair(a, b) {
    const [sa, sb] = [shape(a), shape(b)];
    if (sa[0] !== sb[0] || sa[1] !== sb[1]) {
      const single = (s) => s[0] === 1 && s[1] === 1;
      return single(sa) || single(sb) ? [used(a), used(b)] : [a, b];
    }
    const [[ra, ca], [rb, cb]] = [extent(a), extent(b)];
    const [rows, cols] = [Math.max(ra, rb), Math.max(ca, cb)];
    return [a, b].map((grid) => grid.slice(0, rows).map((row) => row.slice(0, cols)));
  }

  /** How many rows and columns of `grid` reach its last non-blank cell (1 x 1 at least). */
  function extent(grid) {
    let rows = 1;
    let cols = 1;
    for (let i = grid.length - 1; i >= 0; i -= 1) { // from the end: a whole column is mostly blank
      if (grid[i].some((cell) => cellText(cell) !== BLANK)) {
        rows = i + 1;
        break;
      }
    }
    for (const row of grid.slice(0, rows)) {
      for (let j = row.length - 1; j >= cols; j -= 1) {
        if (cellText(row[j]) !== BLANK) {
          cols = j + 1;
          break;
        }
      }
    }
    return [rows, cols];
  }

  /** A count argument (k, dimensions) read from the text its cell shows, as udfs.py reads
   * it: null where the cell is blank, else a whole number from `low` to `high`. */
  function wholeNumber(value, name, low, high) {
    const cell = cellText(oneCell(value, name));
    if (cell === BLANK) return null;
    if (cell instanceof CellError) throw new InputError(`${name} must be a whole number, not ${cell.text}.`);
    const text = cell.trim();
    if (!NUMBER.test(text)) throw new InputError(`${name} must be a whole number, not '${text}'.`);
    const number = Number(text);
    if (!Number.isInteger(number) || number < low || number > high) {
      throw new InputError(`${name} must be a whole number from ${low} to ${high}, not ${text}.`);
    }
    return number;
  }

  const FUNCTIONS = {
    EMBED_SIM: readable("EMBED_SIM", embedSim),
    SIM_MATRIX: readable("SIM_MATRIX", simMatrix),
    SEMANTIC_SEARCH: readable("SEMANTIC_SEARCH", semanticSearch),
    EMBED: readable("EMBED", embed),
    EMBED_INFO: readable("EMBED_INFO", embedInfo),
  };

  /** Register the formulas with Excel (CustomFunctions.associate), once Office is ready. */
  function register() {
    settingsReady();
    for (const [id, fn] of Object.entries(FUNCTIONS)) CustomFunctions.associate(id, fn);
  }

  Object.assign(exports, {
    FUNCTIONS, STORAGE_KEYS, configure, getClient, loadSettings, register, settings, settingsReady,
  });
  if (typeof module !== "object" && typeof CustomFunctions !== "undefined") register();
})(typeof module === "object" && module.exports ? module.exports : (globalThis.SheetFunctions = {}));
