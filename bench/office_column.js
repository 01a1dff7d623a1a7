// An =EMBED_SIM column in a page that has the Office add-in's formulas registered in
// window.__registered: cell by cell, in slices of 100 calls as Excel's runtime hands them
// over. The calls' promises, once all are made. Used by bench/excel_bench.py,
// bench/cell_wait.py and tests/test_office_browser.py.
window.__embedSimColumn = async (left, right) => {
  const fn = window.__registered["EMBED_SIM"];
  const calls = [];
  for (let i = 0; i < left.length; i += 1) {
    calls.push(fn([[left[i]]], [[right[i]]], null, { address: `Sheet1!C${i + 2}` }));
    if (i % 100 === 99) await new Promise((r) => setTimeout(r, 0));
  }
  return calls;
};
