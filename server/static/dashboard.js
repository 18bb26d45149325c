// confide's dashboard: keeps the server-rendered page live (confide.server.dashboard).
// Asks /api/state every few seconds and updates the tables and charts in place. Every value
// is untrusted text from the coordinator's state: it is only ever set as textContent.
// Every epsilon is shown with its delta, and an infinite one as "unbounded" (the API sends
// that string: JSON has no infinity), as the server-rendered page shows them.
"use strict";

(function () {
  const POLL_MS = 1000 * (parseFloat(document.body.dataset.pollSeconds) || 2);
  const charts = new Map(); // "run/kind" -> uPlot instance

  function el(tag, attributes, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function num(value, digits) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "string") return value; // "unbounded"
    return value.toFixed(digits);
  }

  // A delta as Python's "g" format writes it (1e-05, 0.0001), so the text matches the
  // server-rendered page's.
  function g(value) {
    const [mantissa, power] = value.toExponential(5).split("e");
    const exponent = parseInt(power, 10);
    if (exponent < -4 || exponent >= 6) {
      const digits = mantissa.includes(".") ? mantissa.replace(/\.?0+$/, "") : mantissa;
      const sign = exponent < 0 ? "-" : "+";
      return `${digits}e${sign}${String(Math.abs(exponent)).padStart(2, "0")}`;
    }
    return String(parseFloat(value.toPrecision(6)));
  }

  function heading(text, delta) {
    return delta === null || delta === undefined ? text : `${text} (δ = ${g(delta)})`;
  }

  function withDelta(epsilon, delta) {
    const text = num(epsilon, 3);
    return epsilon === null || delta === null || delta === undefined
      ? text
      : `${text} (δ = ${g(delta)})`;
  }

  // A chart has no place for "unbounded": a gap.
  function plotted(value) {
    return typeof value === "number" ? value : null;
  }

  function table(attributes, headings, rows, empty) {
    const t = el("table", attributes);
    const head = el("tr");
    headings.forEach((h) => head.appendChild(el("th", {}, h)));
    t.appendChild(el("thead")).appendChild(head);
    const body = t.appendChild(el("tbody"));
    if (!rows.length) {
      body.appendChild(el("tr", { class: "empty" })).appendChild(
        el("td", { colspan: String(headings.length) }, empty)
      );
    }
    rows.forEach((row) => {
      const tr = body.appendChild(el("tr"));
      row.forEach((cell) => tr.appendChild(el("td", {}, cell === null ? "" : cell)));
    });
    return t;
  }

  function replace(node, fresh) {
    // Only when something changed: a table rebuilt every poll would lose the reader's selection.
    if (!node.isEqualNode(fresh)) node.replaceWith(fresh);
  }

  const INSTITUTIONS = ["name", "node id", "status", "registered (UTC)", "revoked (UTC)"];
  function roundColumns(run) {
    return [
      "round",
      "accuracy",
      "loss",
      heading("ε max", run.delta),
      heading("central ε", run.central_delta),
      "trained",
      "seconds",
      "note",
    ];
  }

  function spendColumns(run) {
    // Each ledger has its own delta: it stands beside its epsilon.
    const thisRun = run.delta === null ? "ε (this run)" : `ε (this run, δ = ${g(run.delta)})`;
    return ["institution", thisRun, "rounds trained", "ε (ledger, every job)"];
  }
  const REFUSALS = ["round", "institution", "phase", "refused by", "reason"];
  const AUDIT = ["seq", "time (UTC)", "actor", "action", "details"];

  function summary(run) {
    let text = run.rounds_planned
      ? `${run.rounds.length} of ${run.rounds_planned} rounds`
      : `${run.rounds.length} rounds`;
    const parts = [];
    if (run.dp && run.delta !== null) parts.push(`sample-level DP, δ = ${g(run.delta)}`);
    else if (run.dp === false) parts.push("no sample-level DP");
    if (run.central_delta !== null) {
      const epsilon = run.institution_level_epsilon;
      let shown = "";
      if (epsilon === "unbounded") shown = "ε unbounded (no finite guarantee), ";
      else if (epsilon !== null) shown = `ε = ${num(epsilon, 3)}, `;
      parts.push(`institution-level DP, ${shown}δ = ${g(run.central_delta)}`);
    }
    if (parts.length) text += ` · ${parts.join("; ")}`;
    if (run.updated) text += ` · updated ${run.updated}`;
    return text;
  }

  function article(run) {
    const a = el("article", { class: "run", "data-run": run.run, "data-status": run.status });
    const h = a.appendChild(el("h3"));
    h.appendChild(el("span", { class: "title" }, `run ${run.run}: ${run.job}`));
    h.appendChild(document.createTextNode(" "));
    h.appendChild(el("span", { class: `status status-${run.status}` }, run.status));
    a.appendChild(el("p", { class: "summary" }, summary(run)));
    a.appendChild(el("p", { class: "detail" }, run.detail || ""));
    const c = a.appendChild(el("div", { class: "charts" }));
    c.appendChild(el("div", { class: "chart", "data-chart": "metrics" }));
    c.appendChild(el("div", { class: "chart", "data-chart": "epsilon" }));
    const [rounds, spend, refusals] = tables(run);
    a.appendChild(el("h4", {}, "Rounds"));
    a.appendChild(rounds);
    a.appendChild(el("h4", {}, "Institutions' spend"));
    a.appendChild(spend);
    a.appendChild(el("h4", {}, "Refusals"));
    a.appendChild(refusals);
    return a;
  }

  function tables(run) {
    return [
      table(
        { class: "rounds" },
        roundColumns(run),
        run.rounds.map((r) => [
          String(r.round),
          num(r.accuracy, 4),
          num(r.loss, 4),
          num(r.epsilon_max, 3),
          num(r.central_epsilon, 3),
          String(r.institutions_trained),
          num(r.seconds, 2),
          r.note || "",
        ]),
        "no round recorded yet"
      ),
      table(
        { class: "spend" },
        spendColumns(run),
        run.institutions.map((s) => [
          s.institution,
          num(s.epsilon, 3),
          String(s.rounds_trained),
          withDelta(s.dataset_epsilon, s.dataset_delta),
        ]),
        "no institution has trained yet"
      ),
      table(
        { class: "refusals" },
        REFUSALS,
        run.refusals.map((r) => [String(r.round), r.institution, r.phase, r.refused_by, r.reason]),
        "no refusals"
      ),
    ];
  }

  function updateRun(node, run) {
    node.dataset.status = run.status;
    const status = node.querySelector("h3 .status");
    status.textContent = run.status;
    status.className = `status status-${run.status}`;
    node.querySelector(".summary").textContent = summary(run);
    node.querySelector(".detail").textContent = run.detail || "";
    const fresh = tables(run);
    ["table.rounds", "table.spend", "table.refusals"].forEach((selector, i) =>
      replace(node.querySelector(selector), fresh[i])
    );
  }

  // Rounds are whole numbers: no tick between them.
  const ROUND_AXIS = { label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] };

  function series(run, kind) {
    const x = run.rounds.map((r) => r.round);
    if (kind === "metrics") {
      return {
        data: [x, run.rounds.map((r) => r.accuracy), run.rounds.map((r) => r.loss)],
        series: [
          { label: "round" },
          { label: "accuracy", stroke: "#1f77b4", width: 2, scale: "acc" },
          { label: "loss", stroke: "#d62728", width: 2, scale: "loss" },
        ],
        axes: [
          ROUND_AXIS,
          { scale: "acc", label: "accuracy" },
          { scale: "loss", label: "loss", side: 1, grid: { show: false } },
        ],
        scales: { x: { time: false }, acc: { range: [0, 1] } },
      };
    }
    const data = [x, run.rounds.map((r) => plotted(r.epsilon_max))];
    const lines = [
      { label: "round" },
      { label: heading("ε max (sample level)", run.delta), stroke: "#2ca02c", width: 2 },
    ];
    if (run.central_delta !== null) {
      // Unbounded rounds are gaps: the table and summary say "unbounded".
      data.push(run.rounds.map((r) => plotted(r.central_epsilon)));
      lines.push({
        label: heading("central ε (institution level)", run.central_delta),
        stroke: "#9467bd",
        width: 2,
      });
    }
    return {
      data: data,
      series: lines,
      axes: [ROUND_AXIS, { label: "ε" }],
      scales: { x: { time: false } },
    };
  }

  function drawChart(node, run, kind) {
    const box = node.querySelector(`.chart[data-chart="${kind}"]`);
    const key = `${run.run}/${kind}`;
    const spec = series(run, kind);
    const shape = `${spec.series.length}`;
    let chart = charts.get(key);
    if (chart && (chart.root.parentNode !== box || box.dataset.shape !== shape)) {
      chart.destroy();
      chart = undefined;
    }
    if (!chart) {
      box.textContent = "";
      box.dataset.shape = shape;
      const width = Math.max(320, Math.min(560, box.clientWidth || 480));
      chart = new uPlot(
        {
          title: kind === "metrics" ? "accuracy and loss (test set)" : "privacy spend (ε)",
          width: width,
          height: 240,
          legend: { live: false },
          series: spec.series,
          axes: spec.axes,
          scales: spec.scales,
        },
        spec.data,
        box
      );
      charts.set(key, chart);
    } else {
      chart.setData(spec.data);
    }
    box.dataset.points = String(run.rounds.length);
  }

  function render(state) {
    document.getElementById("taken-at").textContent = state.taken_at;
    const problems = el("ul", { id: "problems" });
    state.problems.forEach((p) => problems.appendChild(el("li", {}, p)));
    replace(document.getElementById("problems"), problems);

    replace(
      document.getElementById("institutions"),
      table(
        { id: "institutions" },
        INSTITUTIONS,
        state.institutions.map((i) => [i.name, i.node_id, i.status, i.registered_at, i.revoked_at]),
        "no institution has enrolled yet"
      )
    );

    const container = document.getElementById("runs");
    const existing = new Map();
    container.querySelectorAll("article.run").forEach((a) => existing.set(a.dataset.run, a));
    container.querySelectorAll(":scope > p.empty").forEach((p) => p.remove());
    let previous = null;
    state.runs.forEach((run) => {
      let node = existing.get(run.run);
      if (node) {
        existing.delete(run.run);
        updateRun(node, run);
      } else {
        node = article(run);
      }
      // Newest first, as the server lists them.
      if (previous === null) {
        if (container.firstChild !== node) container.insertBefore(node, container.firstChild);
      } else if (previous.nextSibling !== node) {
        previous.after(node);
      }
      previous = node;
      drawChart(node, run, "metrics");
      drawChart(node, run, "epsilon");
    });
    existing.forEach((node, run) => {
      ["metrics", "epsilon"].forEach((kind) => {
        const chart = charts.get(`${run}/${kind}`);
        if (chart) chart.destroy();
        charts.delete(`${run}/${kind}`);
      });
      node.remove();
    });
    if (!state.runs.length && !container.querySelector("p.empty")) {
      container.appendChild(
        el("p", { class: "empty" }, "no run yet: `confide-server submit JOB --dir STATE` starts one")
      );
    }

    const audit = state.audit;
    let verdict;
    if (audit.intact === true) verdict = `chain verifies: ${audit.total} entries`;
    else if (audit.intact === false)
      verdict = `NOT intact (${audit.total} entries): ${audit.problems.join("; ")}`;
    else verdict = `${audit.total} entries; ${audit.problems.join("; ") || "not checked"}`;
    const status = document.getElementById("audit-status");
    status.textContent = verdict;
    status.dataset.intact =
      audit.intact === true ? "intact" : audit.intact === false ? "damaged" : "unchecked";
    replace(
      document.getElementById("audit"),
      table(
        { id: "audit" },
        AUDIT,
        audit.entries.map((e) => [
          String(e.seq),
          e.at,
          e.actor,
          e.action,
          Object.entries(e.details)
            .map(([k, v]) => `${k}=${v === null ? "None" : v}`)
            .join(", "),
        ]),
        "the audit log is empty"
      )
    );
  }

  async function poll() {
    const live = document.getElementById("live");
    try {
      const response = await fetch("/api/state", { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
      live.textContent = `live, every ${POLL_MS / 1000} s`;
      live.dataset.live = "yes";
    } catch (error) {
      live.textContent = `not updating: ${error.message}`;
      live.dataset.live = "error";
    }
    setTimeout(poll, POLL_MS);
  }

  poll();
})();
