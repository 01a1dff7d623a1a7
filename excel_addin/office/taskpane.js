/*
 * The task pane: server status, model and dimension, the API key (entered once, kept
 * by Office's storage for this add-in, sent as Bearer) and how many texts are cached.
 * It shares its page, and so the key and the cache, with the formulas.
 */
(function () {
  "use strict";

  const functions = globalThis.SheetFunctions;
  const byId = (id) => document.getElementById(id);

  function storage() {
    const office = globalThis.OfficeRuntime && globalThis.OfficeRuntime.storage;
    if (office) return office;
    return {
      setItem: async (key, value) => globalThis.localStorage.setItem(key, value),
      removeItem: async (key) => globalThis.localStorage.removeItem(key),
    };
  }

  async function save(event) {
    event.preventDefault();
    const store = storage();
    const values = { apiKey: byId("api-key").value.trim(), instruction: byId("instruction").value.trim() };
    for (const [name, value] of Object.entries(values)) {
      const key = functions.STORAGE_KEYS[name];
      if (value) await store.setItem(key, value);
      else await store.removeItem(key);
    }
    functions.configure(values);
    await refresh();
  }

  async function refresh() {
    const client = functions.getClient();
    byId("server").textContent = client.serverUrl || globalThis.location.origin;
    try {
      const info = await client.info();
      byId("status").textContent = "connected";
      byId("status").className = "ok";
      byId("model").textContent = info.model;
      byId("dimensions").textContent = String(info.dimensions);
    } catch (error) {
      byId("status").textContent = error.message;
      byId("status").className = "bad";
    }
    showCache();
  }

  function showCache() {
    byId("cached").textContent = functions.getClient().cache.size.toLocaleString("en-US");
  }

  async function start() {
    await functions.settingsReady();
    byId("api-key").value = functions.settings.apiKey;
    byId("instruction").value = functions.settings.instruction;
    byId("settings").addEventListener("submit", save);
    byId("clear-cache").addEventListener("click", () => {
      functions.getClient().cache.clear();
      showCache();
    });
    await refresh();
    setInterval(showCache, 2000);
  }

  const ready = globalThis.Office && Office.onReady ? Office.onReady() : Promise.resolve();
  ready.then(start);
})();
