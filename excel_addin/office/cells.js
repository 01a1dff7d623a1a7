/*
 * What a spreadsheet cell becomes before it is embedded: the add-in's copy of
 * serve_app/core/cells.py. tests/cell_cases.json drives both with the same cases.
 *
 * Office passes a range as rows of values: text as strings, numbers (and dates, as
 * their serial numbers) as numbers, booleans as booleans, an empty cell as null
 * (0 on some older Windows builds, which cannot be told from a real 0), and, with
 * allowErrorForDataTypeAny, an error cell as a CustomFunctions.Error.
 */
(function (exports) {
  "use strict";

  const ERROR_TEXTS = new Set([
    "#N/A", "#DIV/0!", "#NAME?", "#NULL!", "#NUM!", "#REF!", "#VALUE!", "#SPILL!",
    "#CALC!", "#GETTING_DATA", "#FIELD!", "#BLOCKED!", "#CONNECT!", "#BUSY!", "#UNKNOWN!",
    "#PYTHON!", "#N/A waiting...",
  ]);

  const BLANK = Object.freeze({ kind: "blank" });

  class CellError {
    constructor(text) {
      this.kind = "error";
      this.text = text;
    }
  }

  /** Whether `value` is an error value as Office hands it over (CustomFunctions.Error). */
  function isErrorValue(value) {
    return value !== null && typeof value === "object" &&
      (value.type === "Error" || typeof value.code === "string" && ERROR_TEXTS.has(value.code));
  }

  /** The text Excel shows for `value` (1024, not 1024.0), BLANK, or a CellError. */
  function cellText(value) {
    if (value === null || value === undefined) return BLANK;
    if (typeof value === "string") {
      if (ERROR_TEXTS.has(value)) return new CellError(value);
      return hasContent(value) ? value : BLANK;
    }
    if (typeof value === "boolean") return value ? "TRUE" : "FALSE";
    if (typeof value === "number") return numberText(value);
    if (isErrorValue(value)) return new CellError(value.code || "#N/A");
    return String(value);
  }

  /** Whether a text holds a character that shows something: not a control, format (a
   * zero-width space, a soft hyphen, a byte-order mark), surrogate or separator. A cell
   * without one is blank. Private-use and unassigned characters count, as in cells.py's
   * has_content, whose Unicode tables may be older than this browser's. */
  function hasContent(text) {
    return /[^\p{Cc}\p{Cf}\p{Cs}\p{Z}]/u.test(text);
  }

  /** A number as Excel's General format shows it: 1024, 0.5, 1.23457E+15. */
  function numberText(x) {
    if (!Number.isFinite(x)) return "#NUM!";
    if (Number.isInteger(x) && Math.abs(x) < 1e15) return String(x === 0 ? 0 : x);
    const text = general(x, 15);
    const at = text.indexOf("e");
    if (at < 0) return text;
    const mantissa = general(Number(text.slice(0, at)), 6);
    const exponent = Number(text.slice(at + 1));
    const digits = String(Math.abs(exponent)).padStart(2, "0");
    return `${mantissa}E${exponent < 0 ? "-" : "+"}${digits}`;
  }

  /** printf's %.{precision}g: fixed or exponential by the exponent, no trailing zeros. */
  function general(x, precision) {
    if (x === 0) return "0";
    const [mantissa, power] = roundedDigits(x, precision);
    const exponent = Number(power);
    if (exponent < -4 || exponent >= precision) {
      const digits = String(Math.abs(exponent)).padStart(2, "0");
      return `${stripZeros(mantissa)}e${exponent < 0 ? "-" : "+"}${digits}`;
    }
    return fixed(mantissa, exponent);
  }

  /** `x` to `precision` significant digits as [mantissa, exponent], rounded on its exact
   * binary value with ties to even, as Python's formatting rounds (toExponential rounds
   * a tie up: 664325886470744.5 would show as ...745, not ...744). */
  function roundedDigits(x, precision) {
    const [mantissa, power] = x.toExponential(precision - 1).split("e");
    const negative = mantissa.startsWith("-");
    const figures = mantissa.replace(/^-/, "").replace(".", "");
    const n = BigInt(figures);
    const scale = Number(power) - (precision - 1); // x ~ n * 10^scale
    if (n % 2n === 1n && isTie(Math.abs(x), n, scale)) {
      const even = String(n - 1n); // the tie went up to an odd last digit; take the even one
      return [`${negative ? "-" : ""}${even[0]}${even.length > 1 ? "." + even.slice(1) : ""}`, power];
    }
    return [mantissa, power];
  }

  /** Whether |x| lies exactly halfway between (n - 1) * 10^scale and n * 10^scale. */
  function isTie(x, n, scale) {
    const [numerator, denominator] = exactRational(x);
    // 2 * x == (2n - 1) * 10^scale, cross-multiplied over the integers.
    const left = 2n * numerator * (scale < 0 ? 10n ** BigInt(-scale) : 1n);
    const right = (2n * n - 1n) * (scale > 0 ? 10n ** BigInt(scale) : 1n) * denominator;
    return left === right;
  }

  /** A positive finite double as numerator / denominator, exactly. */
  function exactRational(x) {
    const view = new DataView(new ArrayBuffer(8));
    view.setFloat64(0, x);
    const bits = view.getBigUint64(0);
    const biased = Number((bits >> 52n) & 0x7ffn);
    const fraction = bits & ((1n << 52n) - 1n);
    const significand = biased === 0 ? fraction : fraction | (1n << 52n);
    const power = (biased === 0 ? 1 : biased) - 1075;
    return power >= 0 ? [significand << BigInt(power), 1n] : [significand, 1n << BigInt(-power)];
  }

  function fixed(mantissa, exponent) {
    const sign = mantissa.startsWith("-") ? "-" : "";
    const figures = mantissa.replace(/^-/, "").replace(".", "");
    const point = exponent + 1; // digits before the decimal point
    const text = point <= 0
      ? `0.${"0".repeat(-point)}${figures}`
      : figures.length > point
        ? `${figures.slice(0, point)}.${figures.slice(point)}`
        : figures + "0".repeat(point - figures.length);
    return sign + stripZeros(text);
  }

  function stripZeros(text) {
    return text.includes(".") ? text.replace(/0+$/, "").replace(/\.$/, "") : text;
  }

  /** Any argument (a value, a row, rows) as rows. */
  function asGrid(value) {
    if (Array.isArray(value)) {
      if (value.length === 0) return [[]];
      return Array.isArray(value[0]) ? value.map((row) => row.slice()) : [value.slice()];
    }
    return [[value]];
  }

  function flatten(grid) {
    return grid.flat();
  }

  function shape(grid) {
    return [grid.length, grid.length ? grid[0].length : 0];
  }

  Object.assign(exports, { BLANK, CellError, ERROR_TEXTS, cellText, numberText, asGrid, flatten, shape, isErrorValue });
})(typeof module === "object" && module.exports ? module.exports : (globalThis.SheetCells = {}));
