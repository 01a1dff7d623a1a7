// The Office add-in's formulas under Node's test runner, with a stub of Excel's
// CustomFunctions runtime, against the real service that tests/test_office_addin.py
// started (ADDIN_SERVER; ADDIN_KEYED_SERVER needs ADDIN_KEY) and with the values the
// Python add-in gave for the same cells (ADDIN_EXPECTED).
"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const http = require("node:http");
const fs = require("node:fs");

// --- a stub of what Excel provides to a custom-functions runtime ----------------------

class CustomFunctionsError extends Error {
  constructor(code, message) {
    super(message || code);
    this.code = code;
    this.type = "Error";
  }
}
const registry = {};
globalThis.CustomFunctions = {
  Error: CustomFunctionsError,
  ErrorCode: {
    invalidValue: "#VALUE!", notAvailable: "#N/A", divisionByZero: "#DIV/0!",
    invalidNumber: "#NUM!", nullReference: "#NULL!",
  },
  associate(id, fn) {
    registry[id.toUpperCase()] = fn;
  },
};

const functions = require("../../excel_addin/office/functions.js");
const metadata = require("../../excel_addin/office/functions.json");
const sharedCases = require("../cell_cases.json");
functions.register();

const SERVER = process.env.ADDIN_SERVER;
const expected = process.env.ADDIN_EXPECTED ? JSON.parse(fs.readFileSync(process.env.ADDIN_EXPECTED, "utf8")) : null;

/** Cell values as Excel hands them over: {error} markers become error objects. */
function asExcel(value) {
  if (Array.isArray(value)) return value.map(asExcel);
  if (value !== null && typeof value === "object" && "error" in value) return new CustomFunctionsError(value.error);
  return value;
}

/** A formula's value as a plain grid: numbers, "" for blank, {error} for an error value. */
function plain(value) {
  if (Array.isArray(value)) return value.map(plain);
  if (value instanceof CustomFunctionsError) return { error: value.code };
  return value;
}

/** One cell's calculation, as Excel makes it: every declared argument (null where the
 * formula leaves an optional one out), then an invocation object. */
async function calculate(id, ...args) {
  const fn = registry[id];
  assert.ok(fn, `${id} is registered`);
  const declared = metadata.functions.find((f) => f.id === id).parameters.length;
  const given = args.map(asExcel).concat(new Array(Math.max(0, declared - args.length)).fill(null));
  try {
    return await fn(...given, { address: "Sheet1!A1" });
  } catch (error) {
    assert.ok(error instanceof CustomFunctionsError, `a failure is a CustomFunctions.Error, not ${error}`);
    return error;
  }
}

/** Many cells, each its own call, handed over in slices as Excel does. */
async function calculateColumn(id, rows, slice = 100) {
  const results = [];
  for (let i = 0; i < rows.length; i += slice) {
    for (const args of rows.slice(i, i + slice)) results.push(calculate(id, ...args));
    await new Promise((resolve) => setTimeout(resolve, 0));
  }
  return Promise.all(results);
}

/** fetch, counting the requests it sends by method and path, and the texts of each
 * embedding request in the order sent. */
function countingFetch() {
  const counts = {};
  const sizes = [];
  const fetch = async (url, options) => {
    const key = `${options.method} ${new URL(url).pathname.replace(/^\/[^/]+(?=\/v1\/)/, "")}`;
    counts[key] = (counts[key] || 0) + 1;
    if (key === "POST /v1/embeddings") sizes.push(JSON.parse(options.body).input.length);
    return globalThis.fetch(url, options);
  };
  return { fetch, counts, sizes };
}

function assertClose(got, want, where) {
  if (Array.isArray(want)) {
    assert.ok(Array.isArray(got), `${where}: an array`);
    assert.equal(got.length, want.length, `${where}: length`);
    want.forEach((w, i) => assertClose(got[i], w, `${where}[${i}]`));
  } else if (typeof want === "number") {
    assert.equal(typeof got, "number", `${where}: a number, got ${JSON.stringify(got)}`);
    assert.ok(Math.abs(got - want) <= 1e-5, `${where}: ${got} vs ${want}`);
  } else {
    assert.deepEqual(got, want, where);
  }
}

// --- the tests -----------------------------------------------------------------------------

test("functions.json lists exactly the registered formulas, each with its code's arity", () => {
  assert.deepEqual(metadata.functions.map((f) => f.id).sort(), Object.keys(registry).sort());
  assert.equal(metadata.allowErrorForDataTypeAny, true); // error cells reach the code, for #N/A
  for (const f of metadata.functions) {
    assert.ok(f.description.length > 20, `${f.id} has a description`);
    for (const p of f.parameters) assert.ok(p.description.length > 10, `${f.id}(${p.name}) has one`);
  }
});

test("values equal the Python add-in's on the same cells", { skip: !expected }, async () => {
  functions.configure({ serverUrl: SERVER, apiKey: "", instruction: "", fetch: undefined });
  for (const [i, c] of expected.cases.entries()) {
    const got = plain(await calculate(c.function, ...c.args));
    assertClose(got, c.python, `case ${i} ${c.function}`);
  }
});

test("a 2,000-row column of separate cells costs full chunks and two partial ones at most, and recalculating it none",
  { skip: !SERVER }, async () => {
    const { fetch, counts, sizes } = countingFetch();
    functions.configure({ serverUrl: SERVER, apiKey: "", instruction: "", fetch });
    const chunk = functions.getClient().settings.chunkSize;
    const rows = Array.from({ length: 2000 }, (_, i) => [
      [[`Question ${i % 700}: how much notice ends the lease?`]], [[`Clause ${i % 450} on rent`]]]);
    const unique = 700 + 450;
    const first = await calculateColumn("EMBED_SIM", rows);
    assert.ok(first.every((v) => typeof v[0][0] === "number"), "every cell has a score");
    // Full chunks, what the first slices left over (sent at once: the calls had paused
    // before them) and the rest once the calls pause again.
    const full = Math.floor(unique / chunk);
    assert.ok(full <= sizes.length && sizes.length <= full + 2, `${sizes.length} requests for ${unique} texts`);
    assert.ok(sizes.filter((n) => n < chunk).length <= 2, `at most two partial chunks: ${sizes}`);
    assert.ok(sizes.every((n) => n <= chunk), `${sizes}`);
    assert.equal(sizes.reduce((a, b) => a + b), unique, `each distinct text sent once: ${sizes}`);
    const before = { ...counts };
    const again = await calculateColumn("EMBED_SIM", rows);
    assert.deepEqual(again, first);
    assert.equal(counts["POST /v1/embeddings"], before["POST /v1/embeddings"], "recalculation sends none");
    assert.equal(counts["GET /v1/models"] || 0, before["GET /v1/models"] || 0);
  });

/** A local server that answers as the test says; closed when the test ends. */
async function fakeServer(t, handler) {
  const server = http.createServer(handler);
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.after(() => {
    server.closeAllConnections();
    server.close();
  });
  return `http://127.0.0.1:${server.address().port}`;
}

/** The JSON body a fake server was sent. */
async function bodyOf(request) {
  let raw = "";
  for await (const part of request) raw += part;
  return JSON.parse(raw);
}

/** An embeddings answer's data: vectorOf(text, index), base64 float32, for each input. */
function embeddingData(input, vectorOf) {
  return input.map((text, index) => ({ object: "embedding", index,
    embedding: Buffer.from(new Float32Array(vectorOf(text, index)).buffer).toString("base64") }));
}

function answer(response, status, body, headers = {}) {
  response.writeHead(status, { "Content-Type": "application/json", ...headers });
  response.end(JSON.stringify(body));
}

const MODELS = { object: "list", data: [{ id: "fake-model", dimensions: 4 }] };

async function refusingUrl() {
  // The suite's runner holds a port bound and never listening; run alone, a port that was
  // just free (listened on, then closed), which another process could take meanwhile.
  if (process.env.ADDIN_REFUSING_SERVER) return process.env.ADDIN_REFUSING_SERVER;
  const server = http.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const url = `http://127.0.0.1:${server.address().port}`;
  await new Promise((resolve) => server.close(resolve));
  return url;
}

test("an unreachable server is a readable #VALUE!", async () => {
  const url = await refusingUrl();
  functions.configure({ serverUrl: url, apiKey: "", fetch: undefined });
  const error = await calculate("EMBED_SIM", [["a"]], [["b"]]);
  assert.equal(error.code, "#VALUE!");
  assert.match(error.message, /^Cannot reach the embedding server at http:\/\/127\.0\.0\.1:\d+\. Is it running/);
});

test("a refused key says so", { skip: !process.env.ADDIN_KEYED_SERVER }, async () => {
  functions.configure({ serverUrl: process.env.ADDIN_KEYED_SERVER, apiKey: "wrong-key", fetch: undefined });
  const error = await calculate("EMBED_SIM", [["a"]], [["b"]]);
  assert.equal(error.code, "#VALUE!");
  assert.match(error.message, /refused the API key\. Set it in the add-in's task pane\./);
  functions.configure({ apiKey: process.env.ADDIN_KEY });
  assert.equal(typeof (await calculate("EMBED_SIM", [["a"]], [["b"]]))[0][0], "number");
});

test("503 is retried after Retry-After, and a server that stays busy says so", async (t) => {
  const posts = [];
  const url = await fakeServer(t, (request, response) => {
    if (request.method === "GET") return answer(response, 200, MODELS);
    posts.push(Date.now());
    if (request.url.includes("busy") || posts.length === 1) {
      return answer(response, 503, { error: { message: "The model is busy.", type: "x", param: null, code: "overloaded" } },
        { "Retry-After": "1" });
    }
    const vector = Buffer.from(new Float32Array([1, 0, 0, 0]).buffer).toString("base64");
    return answer(response, 200, { model: "fake-model", data: [{ embedding: vector }, { embedding: vector }] });
  });
  functions.configure({ serverUrl: url, apiKey: "", fetch: undefined, maxRetries: 2 });
  const score = await calculate("EMBED_SIM", [["a"]], [["b"]]);
  assert.equal(score[0][0], 1);
  assert.equal(posts.length, 2);
  assert.ok(posts[1] - posts[0] >= 900, `waited ${posts[1] - posts[0]} ms for Retry-After: 1`);

  functions.configure({ serverUrl: `${url}/busy` });
  const error = await calculate("EMBED_SIM", [["c"]], [["d"]]);
  assert.equal(error.code, "#VALUE!");
  assert.equal(error.message, "The embedding server is busy or unavailable: The model is busy. Recalculate to retry.");
  functions.configure({ maxRetries: 4 });
});

test("a 503 saying the request ran the replica out of memory is not sent again", async (t) => {
  let posts = 0;
  const url = await fakeServer(t, (request, response) => {
    if (request.method === "GET") return answer(response, 200, MODELS);
    posts += 1;
    return answer(response, 503, { error: { message: "The model's replica ran out of memory on this request.",
      type: "service_unavailable_error", param: null, code: "replica_out_of_memory" } }, { "Retry-After": "1" });
  });
  functions.configure({ serverUrl: url, apiKey: "", fetch: undefined });
  const error = await calculate("EMBED", [["a long clause"]]);
  assert.equal(error.code, "#VALUE!");
  assert.match(error.message, /ran out of memory on this request/);
  assert.equal(posts, 1);
});

test("a new model version under the same name is fetched afresh, not served from the cache", async (t) => {
  let fingerprint = "fp_0123456789";
  let posts = 0;
  const url = await fakeServer(t, async (request, response) => {
    if (request.method === "GET") {
      return answer(response, 200, { object: "list", data: [{ id: "fake-model", dimensions: 4, system_fingerprint: fingerprint }] });
    }
    posts += 1;
    const value = fingerprint === "fp_0123456789" ? [1, 0, 0, 0] : [0, 1, 0, 0];
    const data = embeddingData((await bodyOf(request)).input, () => value);
    return answer(response, 200, { object: "list", model: "fake-model", system_fingerprint: fingerprint, data });
  });
  functions.configure({ serverUrl: url, apiKey: "", fetch: undefined, modelTtlMs: 0 });
  assert.deepEqual(await calculate("EMBED", [["clause"]]), [[1, 0, 0, 0]]);
  assert.deepEqual(await calculate("EMBED", [["clause"]]), [[1, 0, 0, 0]]);
  assert.equal(posts, 1); // the same version: cached
  fingerprint = "fp_9876543210"; // the operator deployed another revision
  assert.deepEqual(await calculate("EMBED", [["clause"]]), [[0, 1, 0, 0]]);
  assert.equal(posts, 2);
  functions.configure({ modelTtlMs: 30000 });
});

test("a cell just typed after the time-to-live is sent without asking for the model", async (t) => {
  // None of its texts cached: the answer names the model, so GET /v1/models would only add
  // a round trip; a model changed meanwhile is still caught from that answer.
  let model = "fake-model-a";
  const seen = [];
  const url = await fakeServer(t, async (request, response) => {
    if (request.method === "GET") {
      seen.push("GET");
      return answer(response, 200, { object: "list", data: [{ id: model, dimensions: 4 }] });
    }
    const input = (await bodyOf(request)).input;
    seen.push(`POST ${input.join(",")}`);
    const value = model === "fake-model-a" ? [1, 0, 0, 0] : [0, 1, 0, 0];
    return answer(response, 200, { object: "list", model, data: embeddingData(input, () => value) });
  });
  functions.configure({ serverUrl: url, apiKey: "", fetch: undefined, modelTtlMs: 0 }); // always stale
  t.after(() => functions.configure({ modelTtlMs: 30000 }));
  assert.deepEqual(await calculate("EMBED", [["termination"]]), [[1, 0, 0, 0]]);
  assert.deepEqual(await calculate("EMBED", [["notice period"]]), [[1, 0, 0, 0]]);
  model = "fake-model-b";
  assert.deepEqual(await calculate("EMBED", [["renewal"]]), [[0, 1, 0, 0]]);
  // The answer named the new model: what was cached under the old one is not used.
  assert.deepEqual(await calculate("EMBED", [["termination"]]), [[0, 1, 0, 0]]);
  // (The GET after "renewal": its answer named another model, so that calculation asked
  // which one serves now, as it must with a time-to-live of 0.)
  assert.deepEqual(seen, ["GET", "POST termination", "POST notice period", "POST renewal", "GET", "POST termination"]);
  // A cached text: the model is asked first, and the cache answers.
  assert.deepEqual(await calculate("EMBED", [["renewal"]]), [[0, 1, 0, 0]]);
  assert.deepEqual(seen.slice(6), ["GET"]);
});

test("SEMANTIC_SEARCH sends its query with the model's query prompt; an instruction takes its place", async (t) => {
  const posts = [];
  const url = await fakeServer(t, async (request, response) => {
    if (request.method === "GET") return answer(response, 200, MODELS);
    const body = await bodyOf(request);
    posts.push([body.input, body.instruction ?? null, body.prompt_name ?? null]);
    const data = embeddingData(body.input, (_, index) => [1, index, 0, 0]);
    return answer(response, 200, { object: "list", model: "fake-model", data });
  });
  functions.configure({ serverUrl: url, apiKey: "", instruction: "", fetch: undefined });
  const candidates = [["Steps to reset"], ["Refunds"]];
  assert.equal(typeof (await calculate("SEMANTIC_SEARCH", "reset my password", candidates, 1))[0][1], "number");
  await calculate("SEMANTIC_SEARCH", "reset my password", candidates, 1, "Find the article");
  const order = (rows) => rows.map((r) => JSON.stringify(r)).sort();
  assert.deepEqual(order(posts), order([
    [["reset my password"], null, "query"],
    [["Steps to reset", "Refunds"], null, null],
    [["reset my password"], "Find the article", null],
  ]));
});

test("an answer of two versions (fp_mixed) is asked again and never cached", async (t) => {
  const answers = ["fp_mixed"];
  let posts = 0;
  const url = await fakeServer(t, async (request, response) => {
    if (request.method === "GET") {
      return answer(response, 200, { object: "list", data: [{ id: "fake-model", dimensions: 4, system_fingerprint: "fp_0123456789" }] });
    }
    posts += 1;
    const fingerprint = answers.length ? answers.shift() : "fp_0123456789";
    const value = fingerprint === "fp_mixed" ? [1, 0, 0, 0] : [0, 0, 1, 0];
    const data = embeddingData((await bodyOf(request)).input, () => value);
    return answer(response, 200, { object: "list", model: "fake-model", system_fingerprint: fingerprint, data });
  });
  functions.configure({ serverUrl: url, apiKey: "", fetch: undefined });
  assert.deepEqual(await calculate("EMBED", [["clause"]]), [[0, 0, 1, 0]]);
  assert.equal(posts, 2); // the mixed answer, then asked again
  assert.deepEqual(await calculate("EMBED", [["clause"]]), [[0, 0, 1, 0]]);
  assert.equal(posts, 2); // cached: the second answer's
});

test("a web page where the service should be is said as such", async (t) => {
  const url = await fakeServer(t, (request, response) => {
    response.writeHead(200, { "Content-Type": "text/html" });
    response.end("<html><body>Welcome to the intranet</body></html>");
  });
  functions.configure({ serverUrl: url, apiKey: "", fetch: undefined });
  const error = await calculate("EMBED", [["a"]]);
  assert.equal(error.code, "#VALUE!");
  assert.match(error.message, /answered, but not as the embedding service does \(it sent text\/html, not JSON\)/);
});

test("a server that does not answer in time is a readable timeout", async (t) => {
  const url = await fakeServer(t, (request, response) => {
    if (request.method === "GET") return answer(response, 200, MODELS);
    // never answers an embedding request
  });
  functions.configure({ serverUrl: url, apiKey: "", fetch: undefined, timeoutMs: 300 });
  const error = await calculate("EMBED", [["a"]]);
  assert.equal(error.code, "#VALUE!");
  assert.match(error.message, /did not answer within 0\.3 s\. It may be starting or busy; recalculate/);
  functions.configure({ timeoutMs: 300000 });
});

test("a lone cell's texts leave at once; a column's later slices wait for the calls to pause", async (t) => {
  const sizes = [];
  const url = await fakeServer(t, async (request, response) => {
    if (request.method === "GET") return answer(response, 200, MODELS);
    const { input } = await bodyOf(request);
    sizes.push(input.length);
    answer(response, 200, { object: "list", model: "fake-model",
      data: embeddingData(input, (text) => [text.length, 1, 0, 0]) });
  });
  // A pause far longer than the test may wait: a cell that waited for it would fail.
  functions.configure({ serverUrl: url, apiKey: "", fetch: undefined, flushDelayMs: 60000 });
  t.after(() => functions.configure({ flushDelayMs: 25 }));
  let timer;
  const late = new Promise((resolve) => { timer = setTimeout(() => resolve("still waiting"), 5000); });
  const cell = await Promise.race([calculate("EMBED_SIM", [["a lone cell"]], [["its other side"]]), late]);
  clearTimeout(timer);
  assert.equal(typeof cell[0][0], "number", `the cell was answered without waiting for a pause: ${cell}`);
  assert.deepEqual(sizes, [2], "its two texts in one request");

  // 300 rows in slices of 100, a few milliseconds apart: the first slice leaves at once
  // (with any slice that reached the runtime before it left), the rest together once the
  // calls pause, not one request per slice.
  functions.configure({ flushDelayMs: 300 }); // a new client: it learns the model first,
  await functions.getClient().info(); // or every slice would wait for that answer together
  const rows = Array.from({ length: 300 }, (_, i) => [[[`clause number ${i}`]]]);
  const column = await calculateColumn("EMBED", rows);
  assert.deepEqual(column.map((v) => v[0][0]), rows.map(([[[text]]]) => text.length));
  assert.equal(sizes.length, 3, `a cell, the first slices, the rest: ${sizes}`);
  assert.ok(sizes[1] >= 100 && sizes[1] < 300 && sizes[1] % 100 === 0, `${sizes}`);
  assert.equal(sizes[1] + sizes[2], 300);
});

test("a cell's text is sent while a long column's requests hold every slot", async (t) => {
  const held = []; // the column's requests, answered once the cell has been
  let holding = true;
  const url = await fakeServer(t, async (request, response) => {
    if (request.method === "GET") return answer(response, 200, MODELS);
    const { input } = await bodyOf(request);
    const data = embeddingData(input, (text) => [text.length, 1, 0, 0]);
    const reply = () => answer(response, 200, { object: "list", model: "fake-model", data });
    if (holding && input.length >= 8) held.push(reply);
    else reply();
  });
  functions.configure({ serverUrl: url, apiKey: "", fetch: undefined, chunkSize: 8, maxInFlight: 2 });
  const rows = Array.from({ length: 48 }, (_, i) => [[[`clause number ${i}`]]]);
  const column = calculateColumn("EMBED", rows); // six requests of 8 texts: two sent, four wait
  const deadline = Date.now() + 10000;
  while (held.length < 2 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 5));
  assert.equal(held.length, 2, "the column holds both slots");

  let timer;
  const late = new Promise((resolve) => { timer = setTimeout(() => resolve("still waiting"), 5000); });
  const cell = await Promise.race([calculate("EMBED", [["one cell"]]), late]);
  clearTimeout(timer);
  assert.deepEqual(cell, [[8, 1, 0, 0]], "the cell was answered while the column waited");
  assert.equal(held.length, 2, "and the column's other requests still waited for a slot");

  holding = false;
  for (const reply of held) reply();
  const vectors = await column;
  assert.deepEqual(vectors.map((v) => v[0][0]), rows.map(([[[text]]]) => text.length));
  functions.configure({ chunkSize: 512, maxInFlight: 4 });
});

test("EMBED's dimensions are checked as the API checks them", { skip: !SERVER }, async () => {
  functions.configure({ serverUrl: SERVER, apiKey: "", instruction: "", fetch: undefined });
  // Wider than the model gave its full width silently; below min_dimensions, a cut the API refuses.
  for (const width of [2048, 8]) {
    const error = await calculate("EMBED", [["a lease"]], width);
    assert.equal(error.message, `EMBED: dimensions must be between 32 and 384 for bundled:minilm, not ${width}.`);
  }
  assert.equal((await calculate("EMBED", [["a lease"]], 32))[0].length, 32);
});

test("bad arguments are a sentence naming the formula", async () => {
  const error = await calculate("EMBED_SIM", [["a"], ["b"]], [["x", "y", "z"]]);
  assert.equal(error.message, "EMBED_SIM: a and b must have the same shape, or one must be a single cell; got 2x1 and 1x3.");
  const k = await calculate("SEMANTIC_SEARCH", "q", [["a"]], 0);
  assert.equal(k.message, "SEMANTIC_SEARCH: k must be a whole number from 1 to 10000, not 0.");
  // An error cell as the instruction is said, not dropped (the scores would differ).
  const task = await calculate("EMBED_SIM", "a", "b", { error: "#REF!" });
  assert.equal(task.message, "EMBED_SIM: the instruction cell holds #REF!.");
});

test("argument checks give the sentences of tests/cell_cases.json, as the xlwings formulas do", async () => {
  // tests/test_office_addin.py checks the xlwings half. Nothing may be sent: the checks come first.
  functions.configure({ serverUrl: await refusingUrl(), apiKey: "", instruction: "", fetch: undefined });
  for (const c of sharedCases.arguments) {
    const error = await calculate(c.function, ...c.args);
    assert.equal(error.message, c.message, `${c.function}(${JSON.stringify(c.args)})`);
  }
});

test("a blank k or dimensions cell takes the default", async (t) => {
  const url = await fakeServer(t, async (request, response) => {
    if (request.method === "GET") return answer(response, 200, MODELS);
    const { input } = await bodyOf(request);
    answer(response, 200, { object: "list", model: "fake-model", data: embeddingData(input, (_, i) => [1, i, 0, 0]) });
  });
  functions.configure({ serverUrl: url, apiKey: "", instruction: "", fetch: undefined });
  const candidates = Array.from({ length: 7 }, (_, i) => [`clause ${i}`]);
  assert.equal((await calculate("SEMANTIC_SEARCH", "q", candidates, "   ")).length, 5);
  assert.equal((await calculate("EMBED", [["a"]], " "))[0].length, 4);
});

test("EMBED_INFO names the server, the model, its width and how much of a cell it reads", async (t) => {
  const url = await fakeServer(t, (request, response) => answer(response, 200,
    { object: "list", data: [{ id: "fake-model", dimensions: 4, max_input_tokens: 8192 }] }));
  functions.configure({ serverUrl: url, apiKey: "", fetch: undefined });
  assert.equal(await calculate("EMBED_INFO"), `${url} · fake-model · 4 dimensions · reads 8,192 tokens of a cell`);
});

test("a 401 says a key is needed when none is set, and refused when one was sent", async (t) => {
  const url = await fakeServer(t, (request, response) => answer(response, 401,
    { error: { message: "Invalid API key.", type: "invalid_request_error", param: null, code: "invalid_api_key" } }));
  functions.configure({ serverUrl: url, apiKey: "", fetch: undefined });
  assert.equal((await calculate("EMBED_INFO")).message,
    `The embedding server at ${url} needs an API key. Enter the key your admin gave you in the add-in's task pane.`);
  functions.configure({ apiKey: "not-the-key" });
  assert.equal((await calculate("EMBED_INFO")).message,
    `The embedding server at ${url} refused the API key. Set it in the add-in's task pane.`);
});

test("a 200 answer that is not the service's is a sentence, not an exception's text", async (t) => {
  let models;
  let embeddings;
  const url = await fakeServer(t, (request, response) =>
    answer(response, 200, request.method === "GET" ? models : embeddings));
  const notTheService = new RegExp("^The server at http://\\S+ answered, but not as the embedding service does " +
    "\\(.+\\)\\. Check that the add-in was installed from the embedding service's manifest\\.$");
  const good = { object: "list", data: [{ id: "fake-model", object: "model", dimensions: 4 }] };
  const answers = [ // the same as tests/test_client.py's
    [{ status: "ok" }, null], [{ object: "list", data: [] }, null], [["fake-model"], null],
    [good, { status: "ok" }],
    [good, { object: "list", model: "fake-model" }],
    [good, { object: "list", model: "fake-model", data: [{ embedding: [0.1, 0.2, 0.3, 0.4] }] }],
    [good, { object: "list", model: "fake-model", data: [{ embedding: "not base64!" }] }],
    [good, { object: "list", model: "fake-model", data: [{ vector: "AAAAAA==" }] }],
    [good, "ok"],
  ];
  for (const [i, [m, e]] of answers.entries()) {
    [models, embeddings] = [m, e];
    functions.configure({ serverUrl: `${url}/${i}`, apiKey: "", fetch: undefined }); // a new client each
    const error = await calculate("EMBED", [[`clause ${i}`]]);
    assert.equal(error.code, "#VALUE!", `answer ${i}`);
    assert.match(error.message, notTheService, `answer ${i}`);
  }
});

test("a whole column costs its used rows only, and blanks inside keep their place", async (t) => {
  const sent = [];
  const url = await fakeServer(t, async (request, response) => {
    if (request.method === "GET") return answer(response, 200, MODELS);
    const { input } = await bodyOf(request);
    sent.push(...input);
    answer(response, 200, { object: "list", model: "fake-model", data: embeddingData(input, (text) => [text.length, 1, 0, 0]) });
  });
  functions.configure({ serverUrl: url, apiKey: "", instruction: "", fetch: undefined });
  const used = [["refund"], [null], ["reset my password"], ["   "]];
  const column = used.concat(Array.from({ length: 1048576 - used.length }, () => [null])); // B:B
  const matrix = await calculate("SIM_MATRIX", [["a"], ["b"]], column);
  assert.deepEqual(matrix.map((row) => row.length), [3, 3]);
  assert.equal(matrix[0][1], "");
  const vectors = await calculate("EMBED", column);
  assert.equal(vectors.length, 3);
  assert.deepEqual(vectors[1], ["", "", "", ""]);
  // Two such columns are cut at the last row either uses: their rows stay paired.
  const scores = await calculate("EMBED_SIM", [["refund"]].concat(Array.from({ length: 999 }, () => [null])),
    used.concat(Array.from({ length: 996 }, () => [null])));
  assert.equal(scores.length, 3);
  assert.ok(Math.abs(scores[0][0] - 1) < 1e-6);
  assert.deepEqual(scores[2], [""]);
  // Ranges of two shapes are refused as before, even when one is blank below its first row.
  const mismatched = await calculate("EMBED_SIM", [["refund"]].concat(Array.from({ length: 8 }, () => [null])),
    Array.from({ length: 19 }, () => ["a"]));
  assert.equal(mismatched.message, "EMBED_SIM: a and b must have the same shape, or one must be a single cell; got 9x1 and 19x1.");
  // A block's trailing blank columns go too.
  const block = [["a", "b", null], [null, null, null]];
  assert.deepEqual((await calculate("EMBED_SIM", block, block)).map((row) => row.length), [2]);
  assert.deepEqual(new Set(sent), new Set(["a", "b", "refund", "reset my password"]));
});
