// The saved settings reach a formula that Excel calculates as soon as the add-in loads,
// before the task pane has opened or read them (a fresh Node process: the module's state
// is this file's alone).
"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");

class CustomFunctionsError extends Error {
  constructor(code, message) {
    super(message || code);
    this.code = code;
  }
}
const registry = {};
globalThis.CustomFunctions = {
  Error: CustomFunctionsError,
  ErrorCode: { invalidValue: "#VALUE!", notAvailable: "#N/A" },
  associate(id, fn) {
    registry[id.toUpperCase()] = fn;
  },
};

// Office's storage answers a moment later, as a real one does.
let reads = 0;
globalThis.OfficeRuntime = {
  storage: {
    async getItem(key) {
      reads += 1;
      await new Promise((resolve) => setTimeout(resolve, 200));
      return key === "sheet-embeddings.api-key" ? process.env.ADDIN_KEY : null;
    },
  },
};

const functions = require("../../excel_addin/office/functions.js");

test("a formula calculated before the saved key is read waits for it", {
  skip: !process.env.ADDIN_KEYED_SERVER,
}, async () => {
  functions.configure({ serverUrl: process.env.ADDIN_KEYED_SERVER });
  functions.register();
  // At once, as Excel does for cells already on the sheet: it ran without the key (401).
  const info = await registry.EMBED_INFO({ address: "Sheet1!A1" });
  assert.match(info, / dimensions · reads [0-9,]+ tokens of a cell$/);
  assert.equal(functions.settings.apiKey, process.env.ADDIN_KEY);
  assert.ok(reads >= 1);
});
