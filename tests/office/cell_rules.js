// Reads cell values (JSON) on stdin and prints what excel_addin/office/cells.js makes of
// each: {"text"}, {"blank"} or {"error"}. An {"error": text} value is handed over as
// Office hands an error cell to a custom function: an error object.
"use strict";
const cells = require("../../excel_addin/office/cells.js");

const values = JSON.parse(require("fs").readFileSync(0, "utf8"));
const results = values.map((value) => {
  const input = value !== null && typeof value === "object" ? { type: "Error", code: value.error } : value;
  const cell = cells.cellText(input);
  if (cell === cells.BLANK) return { blank: true };
  if (cell instanceof cells.CellError) return { error: cell.text };
  return { text: cell };
});
process.stdout.write(JSON.stringify(results));
