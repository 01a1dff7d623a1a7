/*
 * HTTP to the embedding service for the Office add-in's formulas: the calls of one
 * recalculation go out together, each distinct text once, in chunks; a bounded cache
 * keyed by server, model (its name and system_fingerprint), prompt and text; a
 * bounded number of requests in flight; 429 and 503 retried after Retry-After; every
 * failure one readable sentence.
 *
 * Excel calls a custom function once per cell, so a filled-down column of 10,000
 * =EMBED_SIM cells is 10,000 calls, handed over in slices. Each call queues the texts
 * the cache lacks; a full chunk leaves at once. The rest leaves at the end of the task
 * when the calls had paused (a lone cell waits for nothing), else when no new text has
 * arrived for `flushDelayMs`. A chunk of a few texts (a cell recalculated while a long
 * column computes) does not queue behind the column's chunks for a slot: it has one more
 * slot of its own, and the service runs it between two forward passes. The add-in's copy
 * of excel_addin/client.py.
 */
(function (exports) {
  "use strict";

  const DEFAULTS = {
    chunkSize: 512, // texts per request
    chunkChars: 2000000, // characters per request
    maxInFlight: 4, // embedding requests at once
    flushDelayMs: 25, // quiet time before a partial chunk leaves
    cacheBytes: 256 * 1024 * 1024,
    timeoutMs: 300000, // longer than a cold start of the model
    modelTtlMs: 30000, // how long the served model's name is trusted unasked
    maxRetries: 4, // for 429 and 503
    maxRetryWaitMs: 30000,
  };

  // A request of fewer texts is a cell's, not a column's: it goes ahead (the service's
  // serve_app/model/scheduler.py QUICK_TEXTS treats it the same way).
  const QUICK_TEXTS = 8;

  // A 503 not to send again: the request itself may be what the replica died of (memory).
  const NOT_RETRIED = new Set(["replica_out_of_memory"]);

  class ServiceError extends Error {}

  const MIXED = "fp_mixed"; // the system_fingerprint of an answer from two versions (a rolling update)

  /** The model an answer came from: its name, and its version where the server says it
   *  (system_fingerprint: a same-name revision or setting change gives other vectors). */
  function servedAs(name, fingerprint) {
    return fingerprint ? `${name} (${fingerprint})` : name;
  }

  /** A bytes-bounded LRU of vectors (a Map keeps insertion order: oldest first). */
  class VectorCache {
    constructor(maxBytes) {
      this.maxBytes = maxBytes;
      this.bytes = 0;
      this.entries = new Map();
    }
    get(key) {
      const vector = this.entries.get(key);
      if (vector !== undefined) {
        this.entries.delete(key);
        this.entries.set(key, vector);
      }
      return vector;
    }
    set(key, vector) {
      if (vector.byteLength > this.maxBytes) return;
      const old = this.entries.get(key);
      if (old !== undefined) {
        this.bytes -= old.byteLength;
        this.entries.delete(key);
      }
      this.entries.set(key, vector);
      this.bytes += vector.byteLength;
      for (const [oldest, evicted] of this.entries) {
        if (this.bytes <= this.maxBytes) break;
        this.entries.delete(oldest);
        this.bytes -= evicted.byteLength;
      }
    }
    has(key) {
      return this.entries.has(key); // without making it the newest
    }
    get size() {
      return this.entries.size;
    }
    clear() {
      this.entries.clear();
      this.bytes = 0;
    }
  }

  class EmbedClient {
    /**
     * @param {object} settings serverUrl (no trailing slash; "" for the page's own origin),
     *   apiKey (sent as Bearer), fetch (defaults to the global one), and any of DEFAULTS.
     */
    constructor(settings) {
      this.settings = { ...DEFAULTS, ...settings };
      this.serverUrl = (this.settings.serverUrl || "").replace(/\/+$/, "");
      this.fetch = this.settings.fetch || globalThis.fetch.bind(globalThis);
      this.cache = new VectorCache(this.settings.cacheBytes);
      this.requests = 0; // embedding requests sent (POST /v1/embeddings)
      this.modelChecks = 0; // GET /v1/models sent to learn the served model
      this.model = null; // as servedAs names it: the key of its vectors
      this.modelName = null; // the name alone, for sentences
      this.minDimensions = 1; // the smallest Matryoshka cut the server allows, once known
      this.modelSeen = -Infinity;
      this.modelAsked = null; // the GET in flight, shared by every caller
      this.queues = new Map(); // prompt -> Map(text -> deferred)
      this.pending = new Map(); // cache key -> promise of [model, vector], fetched now
      this.timer = null;
      this.leading = false; // the timer sends what this task queued, not after a pause
      this.lastQueued = -Infinity; // when a call last queued texts (Date.now())
      this.inFlight = 0;
      this.waitingForSlot = []; // chunks of QUICK_TEXTS or more, in order
      this.waitingQuick = []; // smaller chunks: they go first, and may use one slot more
    }

    /** Vectors for the distinct `texts` (Map text -> Float32Array), cached where possible;
     * an instruction, else a named prompt of the server's ("query"), goes before each. */
    async vectors(texts, instruction, promptName) {
      // The prompt as the request's own fields, in a string: a cache and queue key.
      const prompt = JSON.stringify(
        instruction ? { instruction } : promptName ? { prompt_name: promptName } : {});
      let model = await this.servedModel(texts, prompt);
      for (let attempt = 0; attempt < 3; attempt += 1) {
        const [found, answered] = await this.lookupOrFetch(texts, prompt, model);
        if (answered.size === 0 || (answered.size === 1 && answered.has(model))) return found;
        // The server changed model during this call: one sheet must not mix two models'
        // vectors, so look up again under the model it now serves.
        model = await this.servedModel();
      }
      throw new ServiceError(
        `The embedding server at ${this.where()} answered with several models or model ` +
        "versions during one calculation. Recalculate once it serves one.");
    }

    async lookupOrFetch(texts, prompt, model) {
      const found = new Map();
      const answered = new Set();
      const awaited = [];
      for (const text of new Set(texts)) {
        const key = this.key(model, prompt, text);
        const vector = this.cache.get(key);
        if (vector !== undefined) {
          found.set(text, vector);
          continue;
        }
        let promise = this.pending.get(key);
        if (promise === undefined) {
          promise = this.enqueue(prompt, text);
          this.pending.set(key, promise);
          const forget = () => this.pending.delete(key);
          promise.then(forget, forget);
        }
        awaited.push(promise.then(([by, v]) => {
          answered.add(by);
          found.set(text, v);
        }));
      }
      if (awaited.length) {
        this.scheduleFlush();
        await Promise.all(awaited);
      }
      return [found, answered];
    }

    /** The model the server answers with: remembered for modelTtlMs, then asked again,
     * unless none of `texts` is cached under the model last known. Those are all sent, and
     * their answers name the model (`vectors` looks up again if it changed), so asking
     * first would only add a round trip to a cell just typed. */
    async servedModel(texts = [], prompt = "") {
      const known = this.model;
      if (known !== null) {
        if (Date.now() - this.modelSeen < this.settings.modelTtlMs) return known;
        if (texts.length && !texts.some((text) => this.cache.has(this.key(known, prompt, text)))) {
          return known;
        }
      }
      return (await this.info()).servedAs;
    }

    /** The served model and its width (GET /v1/models), or ServiceError. */
    async info() {
      if (this.modelAsked === null) {
        this.modelChecks += 1;
        this.modelAsked = this.call("GET", "/v1/models").finally(() => {
          this.modelAsked = null;
        });
      }
      const body = await this.modelAsked;
      const card = body && Array.isArray(body.data) ? body.data[0] : undefined;
      if (!card || card.id === undefined) throw new ServiceError(this.notThisService("its JSON lists no model"));
      const served = this.learn(card.id, card.system_fingerprint);
      this.minDimensions = card.min_dimensions || 1;
      return { model: card.id, dimensions: card.dimensions, servedAs: served, maxInputTokens: card.max_input_tokens };
    }

    key(model, prompt, text) {
      // Lengths first, so no two parts can run into each other.
      return `${this.serverUrl.length}:${this.serverUrl}${model.length}:${model}${prompt.length}:${prompt}${text}`;
    }

    /** Remember the model an answer named; its key (servedAs). */
    learn(name, fingerprint) {
      this.model = servedAs(name, fingerprint);
      this.modelName = name;
      this.modelSeen = Date.now();
      return this.model;
    }

    enqueue(prompt, text) {
      let queue = this.queues.get(prompt);
      if (queue === undefined) {
        queue = new Map();
        this.queues.set(prompt, queue);
      }
      let deferred = queue.get(text);
      if (deferred === undefined) {
        deferred = {};
        deferred.promise = new Promise((resolve, reject) => {
          deferred.resolve = resolve;
          deferred.reject = reject;
        });
        queue.set(text, deferred);
      }
      return deferred.promise;
    }

    /** Full chunks leave now. The rest leaves at the end of this task if no call came in the
     * flushDelayMs before (a lone cell, or a column's first slice), else once the calls
     * have paused for flushDelayMs. */
    scheduleFlush() {
      for (const [prompt, queue] of this.queues) {
        while (queue.size >= this.settings.chunkSize) this.send(prompt, this.take(queue));
        if (queue.size === 0) this.queues.delete(prompt);
      }
      const now = Date.now();
      const paused = now - this.lastQueued >= this.settings.flushDelayMs;
      this.lastQueued = now;
      if (this.timer !== null) {
        if (this.leading) return; // these texts leave with the task's first
        clearTimeout(this.timer);
      }
      this.leading = paused;
      this.timer = setTimeout(() => {
        this.timer = null;
        for (const [prompt, queue] of this.queues) {
          while (queue.size) this.send(prompt, this.take(queue));
        }
        this.queues.clear();
      }, paused ? 0 : this.settings.flushDelayMs);
    }

    take(queue) {
      const chunk = [];
      let chars = 0;
      for (const [text, deferred] of queue) {
        if (chunk.length && (chunk.length >= this.settings.chunkSize ||
            chars + text.length > this.settings.chunkChars)) break;
        chunk.push([text, deferred]);
        chars += text.length;
        queue.delete(text);
      }
      return chunk;
    }

    async send(prompt, chunk) {
      await this.slot(chunk.length < QUICK_TEXTS);
      try {
        const texts = chunk.map(([text]) => text);
        const payload = { input: texts, encoding_format: "base64", ...JSON.parse(prompt) };
        this.requests += 1;
        const body = await this.call("POST", "/v1/embeddings", payload);
        if (!body || !Array.isArray(body.data)) {
          throw new ServiceError(this.notThisService("its JSON holds no embeddings"));
        }
        if (body.data.length !== texts.length) {
          throw new ServiceError(
            `The embedding server at ${this.where()} answered ${body.data.length} ` +
            `vectors for ${texts.length} texts. Check that the add-in is served by this service.`);
        }
        let vectors;
        try {
          vectors = body.data.map((item) => decode(item.embedding));
        } catch (error) {
          throw new ServiceError(this.notThisService("its embeddings are not base64 vectors"));
        }
        // An answer of two versions is neither cached nor taken as the served model, so
        // the calculation asks again (vectors).
        const mixed = body.system_fingerprint === MIXED;
        const served = mixed ? servedAs(body.model, MIXED) : this.learn(body.model, body.system_fingerprint);
        vectors.forEach((vector, i) => {
          if (!mixed) this.cache.set(this.key(served, prompt, texts[i]), vector);
          chunk[i][1].resolve([served, vector]);
        });
      } catch (error) {
        for (const [, deferred] of chunk) deferred.reject(error);
      } finally {
        this.release();
      }
    }

    /** A request may leave: at most maxInFlight at once, and one more for a quick chunk
     * (browsers open six connections to a host). */
    slot(quick) {
      if (this.inFlight < this.settings.maxInFlight + (quick ? 1 : 0)) {
        this.inFlight += 1;
        return Promise.resolve();
      }
      return new Promise((resolve) => (quick ? this.waitingQuick : this.waitingForSlot).push(resolve));
    }

    release() {
      this.inFlight -= 1;
      const limit = this.settings.maxInFlight;
      const next = this.waitingQuick.length && this.inFlight < limit + 1 ? this.waitingQuick.shift()
        : this.waitingForSlot.length && this.inFlight < limit ? this.waitingForSlot.shift() : null;
      if (next) {
        this.inFlight += 1;
        next();
      }
    }

    where() {
      return this.serverUrl || "this add-in's server";
    }

    /** A 200 answer that is not the service's: `what` says how (an HTML page, other JSON). */
    notThisService(what) {
      return `The server at ${this.where()} answered, but not as the embedding service does (${what}). ` +
        "Check that the add-in was installed from the embedding service's manifest.";
    }

    /** One HTTP call; 429/503 retried after Retry-After; failures as ServiceError. */
    async call(method, path, payload) {
      for (let attempt = 0; ; attempt += 1) {
        const response = await this.once(method, path, payload);
        if (response.ok) {
          try {
            return await response.json();
          } catch (error) {
            const type = response.headers.get("content-type") || "no content type";
            throw new ServiceError(this.notThisService(`it sent ${type}, not JSON`));
          }
        }
        const { message, code } = await serverError(response);
        const status = response.status;
        if ((status === 429 || status === 503) && !NOT_RETRIED.has(code) && attempt < this.settings.maxRetries) {
          await sleep(retryAfterMs(response, this.settings.maxRetryWaitMs));
          continue;
        }
        throw new ServiceError(describe(status, message, this.where(), path, response, this.settings.apiKey));
      }
    }

    async once(method, path, payload) {
      const headers = { Accept: "application/json" };
      if (this.settings.apiKey) headers.Authorization = `Bearer ${this.settings.apiKey}`;
      if (payload !== undefined) headers["Content-Type"] = "application/json";
      const controller = new AbortController();
      const timer = setTimeout(() => controller.abort(), this.settings.timeoutMs);
      try {
        return await this.fetch(this.serverUrl + path, {
          method, headers, signal: controller.signal,
          body: payload === undefined ? undefined : JSON.stringify(payload),
        });
      } catch (error) {
        if (controller.signal.aborted) {
          throw new ServiceError(
            `The embedding server at ${this.where()} did not answer within ` +
            `${seconds(this.settings.timeoutMs)} s. It may be starting or busy; ` +
            "recalculate to try again.");
        }
        throw new ServiceError(
          `Cannot reach the embedding server at ${this.where()}. Is it running, and does this ` +
          "computer trust its certificate?");
      } finally {
        clearTimeout(timer);
      }
    }
  }

  function describe(status, message, where, path, response, apiKey) {
    if (status === 401 && !apiKey) {
      return `The embedding server at ${where} needs an API key. Enter the key your admin gave you in the add-in's task pane.`;
    }
    if (status === 401) return `The embedding server at ${where} refused the API key. Set it in the add-in's task pane.`;
    if (status === 404 && !(response.headers.get("content-type") || "").includes("json")) {
      return `Nothing answers at ${where}${path} yet: the embedding service may still be starting ` +
        "(recalculate in a few seconds).";
    }
    if (status === 429 || status === 503) return `The embedding server is busy or unavailable: ${message} Recalculate to retry.`;
    if (status >= 400 && status < 500) return `The embedding server refused the request: ${message}`;
    return `The embedding server at ${where} failed (${status}): ${message}`;
  }

  /** The error envelope's message and code, or a stand-in for an answer without one. */
  async function serverError(response) {
    try {
      const body = await response.json();
      return { message: body.error.message, code: body.error.code };
    } catch (error) {
      return { message: `HTTP ${response.status}.`, code: null };
    }
  }

  function retryAfterMs(response, cap) {
    const seconds = Number(response.headers.get("retry-after"));
    return Math.min(cap, Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : 1000);
  }

  function seconds(ms) {
    return ms < 10000 ? (ms / 1000).toFixed(1) : String(Math.round(ms / 1000));
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  /** A base64 vector as the service sends it: little-endian float32. Throws on anything else. */
  function decode(text) {
    if (typeof text !== "string") throw new TypeError("not base64");
    const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
    if (bytes.length % 4) throw new RangeError("not float32");
    const view = new DataView(bytes.buffer);
    const vector = new Float32Array(bytes.length / 4);
    for (let i = 0; i < vector.length; i += 1) vector[i] = view.getFloat32(i * 4, true);
    return vector;
  }

  /** Cosine similarity within [-1, 1] (serve_app/core/vectors.py's kernel). */
  function cosine(a, b) {
    let dot = 0;
    let aa = 0;
    let bb = 0;
    for (let i = 0; i < a.length; i += 1) {
      dot += a[i] * b[i];
      aa += a[i] * a[i];
      bb += b[i] * b[i];
    }
    const score = dot / (Math.max(Math.sqrt(aa), 1e-12) * Math.max(Math.sqrt(bb), 1e-12));
    return Math.min(1, Math.max(-1, score));
  }

  /** Matryoshka: the first `dimensions` values, re-normalised. */
  function truncate(vector, dimensions) {
    if (!dimensions || dimensions >= vector.length) return vector;
    const cut = vector.slice(0, dimensions);
    let norm = 0;
    for (const x of cut) norm += x * x;
    norm = Math.max(Math.sqrt(norm), 1e-12);
    return cut.map((x) => x / norm);
  }

  Object.assign(exports, { DEFAULTS, EmbedClient, ServiceError, VectorCache, cosine, decode, truncate });
})(typeof module === "object" && module.exports ? module.exports : (globalThis.SheetClient = {}));
