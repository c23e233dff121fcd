// The run page: charts of the run's time series (GET /api/runs/{slug}/metrics, drawn with the vendored uPlot),
// and live progress and leaderboard from the server-sent events of /runs/{slug}/events.
"use strict";

(() => {
  const main = document.getElementById("main");
  const slug = main.dataset.run;
  const api = `/api/runs/${encodeURIComponent(slug)}`;
  const numbers = new Intl.NumberFormat("en");
  const CHARTS = [
    { id: "loss", label: "Mean loss", color: "#1f4e8c", value: (b) => b.loss_mean, digits: 3 },
    { id: "throughput", label: "Samples/s", color: "#8a3b00", value: (b) => b.samples_per_second, digits: 1 },
    { id: "peers", label: "Peers", color: "#0b5d1e", value: (b) => b.active_peers, digits: 0 },
  ];

  function duration(seconds) {
    const minutes = Math.floor(seconds / 60);
    const hours = Math.floor(minutes / 60);
    return hours ? `${hours} h ${String(minutes % 60).padStart(2, "0")} min` : `${minutes} min`;
  }

  function plotWidth(element) {
    return Math.max(240, element.clientWidth);
  }

  const charts = CHARTS.map((spec) => {
    const figure = document.getElementById(`chart-${spec.id}`);
    const target = figure.querySelector(".plot");
    const options = {
      width: plotWidth(target),
      height: 200,
      legend: { show: false },
      scales: { x: { time: true } },
      series: [{}, { label: spec.label, stroke: spec.color, width: 2, points: { show: true, size: 6 }, spanGaps: true }],
      axes: [{ stroke: "#333", space: 90 }, { stroke: "#333", size: 56 }],
    };
    return { spec, figure, target, plot: new uPlot(options, [[], []], target) };
  });

  window.addEventListener("resize", () => {
    for (const chart of charts) chart.plot.setSize({ width: plotWidth(chart.target), height: 200 });
  });

  async function refreshCharts() {
    const response = await fetch(`${api}/metrics?bucket_seconds=60`, { headers: { Accept: "application/json" } });
    if (!response.ok) return;
    const body = await response.json();
    const times = body.data.map((bucket) => Date.parse(bucket.start) / 1000);
    for (const chart of charts) {
      const values = body.data.map(chart.spec.value);
      chart.plot.setData([times, values]);
      const known = values.filter((v) => v !== null && v !== undefined);
      chart.figure.dataset.points = String(known.length);
      const summary = chart.figure.querySelector(".chart-summary");
      summary.textContent = known.length
        ? `Latest: ${known[known.length - 1].toFixed(chart.spec.digits)} (${known.length} points).`
        : "No reports in the last hour yet.";
    }
  }

  function redraw() {
    // A failed fetch (server restarting) leaves the old charts; the next update tries again.
    refreshCharts().catch(() => {});
  }

  function showProgress(progress) {
    for (const cell of document.querySelectorAll("#progress [data-key]")) {
      const value = progress[cell.dataset.key];
      cell.textContent = typeof value === "number" ? numbers.format(value) : String(value);
    }
  }

  function showLeaderboard(rows) {
    const body = document.querySelector("#leaderboard tbody");
    const fresh = rows.map((row) => {
      const tr = document.createElement("tr");
      const cells = [
        [row.rank, false],
        [row.display_name, false],
        [numbers.format(row.verified_samples), true],
        [numbers.format(row.reported_samples), true],
        [row.rounds, true],
        [duration(row.online_seconds), true],
      ];
      for (const [text, numeric] of cells) {
        const td = document.createElement("td");
        td.textContent = String(text);
        if (numeric) td.className = "num";
        tr.append(td);
      }
      return tr;
    });
    if (fresh.length) body.replaceChildren(...fresh);
  }

  const status = document.getElementById("live-status");
  function setStatus(text) {
    if (status.textContent !== text) status.textContent = text;
  }

  function onUpdate(event) {
    const data = JSON.parse(event.data);
    showProgress(data.progress);
    showLeaderboard(data.leaderboard);
    redraw();
    main.dataset.updates = String(Number(main.dataset.updates || 0) + 1);
  }

  // EventSource retries a dropped stream by itself, but gives up on an error status (a busy server answers
  // 503): then a new one is opened a little later.
  let events = null;
  function connect() {
    events = new EventSource(`/runs/${encodeURIComponent(slug)}/events`);
    events.addEventListener("open", () => setStatus("Live updates: on"));
    events.addEventListener("update", onUpdate);
    events.addEventListener("error", () => {
      setStatus("Live updates: reconnecting…");
      if (events.readyState === EventSource.CLOSED) setTimeout(connect, 15000);
    });
  }

  redraw();
  connect();
  window.addEventListener("pagehide", () => events.close());
})();
