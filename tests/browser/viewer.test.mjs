// The web viewer in a real headless Chromium: upload an image, submit, and check that the grid
// shows exactly what POST /lens answers for the same request. Also the error paths, the hover
// card, and that the page makes no request outside the service (it must work offline).
//
//   node tests/browser/viewer.test.mjs http://127.0.0.1:8000 target/browser
//
// Chromium: $CHROMIUM or /usr/bin/chromium (Debian's package `chromium`). A screenshot of the
// answered page is written to OUT/viewer.png.
import { chromium } from "playwright-core";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const [base, outDir = "target/browser"] = process.argv.slice(2);
if (!base) {
  console.error("usage: node viewer.test.mjs BASE_URL [OUT_DIR]");
  process.exit(2);
}
const here = path.dirname(fileURLToPath(import.meta.url));
const imagePath = path.join(here, "..", "fixtures", "images", "landscape.png");
fs.mkdirSync(outDir, { recursive: true });

let failures = 0;
function check(ok, what) {
  if (ok) {
    console.log("ok   " + what);
  } else {
    failures += 1;
    console.log("FAIL " + what);
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const problems = [];
  const origin = new URL(base).origin;
  page.on("console", (m) => {
    if (m.type() === "error") problems.push("console: " + m.text());
  });
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  const foreign = [];
  page.on("request", (r) => {
    const u = r.url();
    if (!u.startsWith(origin) && !u.startsWith("blob:") && !u.startsWith("data:")) foreign.push(u);
  });

  await page.goto(base + "/");
  await page.waitForSelector("body[data-models=loaded]", { timeout: 30000 });
  const model = await page.$eval("#model", (s) => s.value);
  check(model !== "", `the model list is filled (${model})`);

  // 1. An empty prompt is refused in the page, before any request.
  await page.click("#submit");
  check((await page.textContent("#error")).includes("prompt"), "an empty prompt is refused with a message");

  // 2. A real request: image + prompt + targets.
  await page.setInputFiles("#image", imagePath);
  await page.waitForSelector("#preview", { state: "visible", timeout: 10000 });
  check(await page.$eval("#preview", (img) => img.naturalWidth > 0), "the chosen image is shown");
  const prompt = "Color of the main object:";
  await page.fill("#prompt", prompt);
  await page.selectOption("#positions", "text");
  await page.fill("#top-k", "3");
  await page.fill("#targets", " red, blue");
  await page.click("#submit");
  await page.waitForSelector("body[data-state=done]", { timeout: 120000 });
  await page.screenshot({ path: path.join(outDir, "viewer.png"), fullPage: true });
  check(!(await page.isVisible("#error")), "no error is shown after the request");

  // The same request straight to the API.
  const form = new FormData();
  form.append("prompt", prompt);
  form.append("model", model);
  form.append(
    "options",
    JSON.stringify({
      top_k: 3,
      layers: "all",
      summary: true,
      exclude_special: false,
      chat_template: true,
      positions: "text",
      targets: [" red", " blue"],
    }),
  );
  form.append("image", new Blob([fs.readFileSync(imagePath)], { type: "image/png" }), "landscape.png");
  const resp = await fetch(base + "/lens", { method: "POST", body: form });
  check(resp.status === 200, `POST /lens answers 200 (got ${resp.status})`);
  const answer = await resp.json();

  const rows = await page.$$eval("#grid tbody tr", (trs) =>
    trs.map((tr) => ({
      layer: Number(tr.dataset.layer),
      cells: [...tr.querySelectorAll("td")].map((td) => ({
        token: td.dataset.token,
        text: td.textContent,
        prob: Number(td.dataset.prob),
        position: Number(td.dataset.position),
      })),
    })),
  );
  check(rows.length === answer.num_layers + 1, `the grid has L+1 = ${answer.num_layers + 1} rows (got ${rows.length})`);
  check(
    JSON.stringify(rows.map((r) => r.layer)) === JSON.stringify(answer.layers.map((l) => l.layer).reverse()),
    "the final layer is the top row, layer 0 the bottom one",
  );
  const positions = answer.layers[0].positions.map((p) => p.position);
  const textPositions = answer.input.tokens.filter((t) => t.kind !== "image").map((t) => t.position);
  check(
    JSON.stringify(positions) === JSON.stringify(textPositions),
    `the API answered every text position (${positions.length})`,
  );
  const headers = await page.$$eval("#grid thead th[data-position]", (ths) => ths.map((th) => Number(th.dataset.position)));
  check(JSON.stringify(headers) === JSON.stringify(positions), "the grid's columns are the answered positions");
  let tokensMatch = rows.length === answer.layers.length;
  let probsMatch = tokensMatch;
  const displayed = [];
  rows.forEach((row) => {
    const layer = answer.layers.find((l) => l.layer === row.layer);
    if (!layer || row.layer !== layer.layer || row.cells.length !== layer.positions.length) {
      tokensMatch = false;
      return;
    }
    row.cells.forEach((cell, j) => {
      const top = layer.positions[j].top[0];
      if (cell.token !== top.token || cell.position !== layer.positions[j].position) tokensMatch = false;
      if (Math.abs(cell.prob - top.prob) > 1e-5) probsMatch = false;
      displayed.push([cell.text, top.token]);
    });
  });
  check(tokensMatch, "every cell's top-1 token equals the API's answer");
  check(probsMatch, "every cell's probability equals the API's answer (1e-5)");
  // What the cell shows is the token, with only spaces at its ends, newlines, tabs and other control
  // characters made visible.
  const shown = displayed.every(([text, token]) => {
    if (token === "") return text === "∅";
    const back = text
      .replace(/↵/g, "\n")
      .replace(/⇥/g, "\t")
      .replace(/\\x([0-9a-f]{2})/g, (_, h) => String.fromCharCode(parseInt(h, 16)))
      .replace(/␣/g, " ");
    return back === token;
  });
  check(shown, "each cell shows its token's text");

  await page.uncheck("#final-on-top");
  const flipped = await page.$$eval("#grid tbody tr", (trs) => trs.map((tr) => Number(tr.dataset.layer)));
  check(
    JSON.stringify(flipped) === JSON.stringify(answer.layers.map((l) => l.layer)),
    "unticking 'final layer on top' puts layer 0 first",
  );
  await page.check("#final-on-top");

  // Curves: confidence (summary and last position), entropy, KL, and the two targets.
  const series = await page.$$eval(".charts figure", (fs) => fs.map((f) => [f.id, Number(f.dataset.series), f.querySelectorAll("polyline").length]));
  const byId = Object.fromEntries(series.map(([id, n, lines]) => [id, { n, lines }]));
  check(byId["chart-confidence"].lines === 2, "the confidence chart draws the mean max prob and the last position");
  check(byId["chart-entropy"].lines >= 1 && byId["chart-kl"].lines >= 1, "the entropy and KL charts are drawn");
  check(byId["chart-targets"].lines === 2, "the target chart draws both targets");
  const meanPoints = await page.$$eval("#chart-confidence polyline", (ls) => ls[0].getAttribute("points").split(" ").length);
  check(meanPoints === answer.num_layers + 1, "the confidence curve has a point per layer");

  // Hover card with the top-k.
  await page.hover("#grid tbody tr:last-child td:last-child");
  const tipRows = await page.$$eval("#tooltip tr", (trs) => trs.length);
  check((await page.isVisible("#tooltip")) && tipRows === 3 + 2, `hovering a cell shows its top-3 and the 2 targets (${tipRows} rows)`);
  await page.mouse.move(0, 0);

  // 3. The image tokens over the image: one patch per image token, coloured by its top-1
  // probability at the layer the slider picks (the last layer first).
  await page.selectOption("#positions", "image");
  await page.click("#submit");
  await page.waitForSelector("body[data-state=done]", { timeout: 120000 });
  await page.waitForSelector("#heat", { state: "visible", timeout: 10000 });
  const imageForm = new FormData();
  imageForm.append("prompt", prompt);
  imageForm.append("model", model);
  imageForm.append("options", JSON.stringify({ top_k: 3, positions: "image", targets: [" red", " blue"] }));
  imageForm.append("image", new Blob([fs.readFileSync(imagePath)], { type: "image/png" }), "landscape.png");
  const imageAnswer = await (await fetch(base + "/lens", { method: "POST", body: imageForm })).json();
  const g = imageAnswer.input.image_grid;
  const heatProbs = async () => page.$$eval("#heat-grid div", (ds) => ds.map((d) => Number(d.dataset.prob)));
  const near = (a, b) => a.length === b.length && a.every((x, i) => Math.abs(x - b[i]) <= 1e-5);
  const topAt = (layer) => layer.positions.map((p) => p.top[0].prob);
  let probs = await heatProbs();
  check(probs.length === g.rows * g.cols, `the image map has rows × cols = ${g.rows * g.cols} patches (got ${probs.length})`);
  check(near(probs, topAt(imageAnswer.layers[imageAnswer.layers.length - 1])), "the image map shows the last layer's top-1 probabilities");
  await page.$eval("#heat-layer", (s) => {
    s.value = "0";
    s.dispatchEvent(new Event("input"));
  });
  probs = await heatProbs();
  check(near(probs, topAt(imageAnswer.layers[0])), "moving the slider to layer 0 shows layer 0's probabilities");
  await page.selectOption("#heat-by", "target:1");
  probs = await heatProbs();
  check(
    near(probs, imageAnswer.layers[0].positions.map((p) => p.targets[1].prob)),
    "colouring by a target shows that target's probabilities",
  );
  // Scaled to the map's largest value, the strongest patch is fully coloured.
  await page.selectOption("#heat-scale", "relative");
  const top = await page.$eval("#heat-grid", (g) => Number(g.dataset.top));
  const target1 = imageAnswer.layers[0].positions.map((p) => p.targets[1].prob);
  const alphas = await page.$$eval("#heat-grid div", (ds) =>
    ds.map((d) => Number(getComputedStyle(d).backgroundColor.match(/[\d.]+\)$/)[0].slice(0, -1))),
  );
  check(
    Math.abs(top - Math.max(...target1)) <= 1e-6 && Math.abs(Math.max(...alphas) - 0.85) < 0.01,
    `relative scaling: the largest patch is fully coloured (max ${top.toExponential(2)}, alpha ${Math.max(...alphas)})`,
  );
  await page.screenshot({ path: path.join(outDir, "viewer-image-tokens.png"), fullPage: true });

  // 3b. The model's answer: 4 generated tokens, the fed-back ones as marked extra columns after
  // the prompt's, each with its tokens and probabilities as POST /lens gives them, and a curve per
  // emitted token (its probability by layer).
  await page.selectOption("#positions", "last");
  await page.fill("#generate", "4");
  await page.click("#submit");
  await page.waitForSelector("body[data-state=done]", { timeout: 120000 });
  const genForm = new FormData();
  genForm.append("prompt", prompt);
  genForm.append("model", model);
  genForm.append(
    "options",
    JSON.stringify({ top_k: 3, layers: "all", positions: "last", targets: [" red", " blue"], generate: 4 }),
  );
  genForm.append("image", new Blob([fs.readFileSync(imagePath)], { type: "image/png" }), "landscape.png");
  const genAnswer = await (await fetch(base + "/lens", { method: "POST", body: genForm })).json();
  const n = genAnswer.answer.tokens.length;
  const marked = await page.$$eval("#grid thead th.answer-token", (ths) => ths.map((th) => Number(th.dataset.position)));
  const wantMarked = genAnswer.layers[0].positions.map((p) => p.position).filter((p) => p >= genAnswer.input.num_tokens);
  check(n === 4 && JSON.stringify(marked) === JSON.stringify(wantMarked) && marked.length === n - 1,
    `the answer's fed-back tokens are ${n - 1} marked columns after the prompt's (${JSON.stringify(marked)})`);
  const headIds = await page.$$eval("#grid thead th.answer-token", (ths) => ths.map((th) => Number(th.dataset.id)));
  check(
    JSON.stringify(headIds) === JSON.stringify(genAnswer.answer.tokens.slice(0, n - 1).map((t) => t.id)),
    "each answer column is headed by the token fed back there",
  );
  const lastRow = await page.$$eval("#grid tbody tr:first-child td", (tds) =>
    tds.map((td) => ({ token: td.dataset.token, prob: Number(td.dataset.prob), position: Number(td.dataset.position) })),
  );
  const final = genAnswer.layers[genAnswer.layers.length - 1].positions;
  check(
    lastRow.length === final.length &&
      lastRow.every((c, i) => c.position === final[i].position && c.token === final[i].top[0].token && Math.abs(c.prob - final[i].top[0].prob) <= 1e-5),
    "the final layer's row, answer columns included, equals the API's answer",
  );
  check(
    final.slice(0, n).every((p, i) => p.top[0].id === genAnswer.answer.tokens[i].id),
    "at the final layer each position's top-1 is the token the model emitted (greedy)",
  );
  const answerChart = await page.$eval("#chart-answer", (f) => ({
    hidden: f.hidden,
    lines: f.querySelectorAll("polyline").length,
  }));
  check(!answerChart.hidden && answerChart.lines === n, `the answer chart draws one curve per emitted token (${answerChart.lines})`);
  check((await page.textContent("#summary-line")).includes(`answer (${n} tokens`), "the summary line gives the answer");
  await page.screenshot({ path: path.join(outDir, "viewer-answer.png"), fullPage: true });
  await page.fill("#generate", "0");

  check(problems.length === 0, "no console errors: " + problems.join("; "));

  // 4. A file that is not an image: the service's message is shown, the page still works.
  const bad = path.join(outDir, "not-an-image.png");
  fs.writeFileSync(bad, "this is not a PNG");
  await page.setInputFiles("#image", bad);
  await page.click("#submit");
  await page.waitForSelector("body[data-state=error]", { timeout: 60000 });
  const err = await page.textContent("#error");
  check(/^4\d\d invalid_image: /.test(err), `a bad image shows the API's error (${err.trim()})`);
  check(foreign.length === 0, "no request leaves the service: " + foreign.join(", "));
} finally {
  await browser.close();
}
if (failures) {
  console.error(`${failures} check(s) failed`);
  process.exit(1);
}
console.log("the viewer works in Chromium");
