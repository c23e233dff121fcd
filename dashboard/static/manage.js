// The organizer's run page: the verification failures on record, from GET /api/runs/{slug}/verification-failures.
"use strict";

(async () => {
  const slug = document.getElementById("main").dataset.run;
  const status = document.getElementById("failures-status");
  const table = document.getElementById("failures");
  let response;
  try {
    response = await fetch(`/api/runs/${encodeURIComponent(slug)}/verification-failures`, {
      headers: { Accept: "application/json" },
    });
  } catch {
    status.textContent = "Could not reach the server; reload the page to try again.";
    return;
  }
  if (!response.ok) {
    status.textContent = `Could not load the failures (HTTP ${response.status}).`;
    return;
  }
  const body = await response.json();
  if (!body.count) {
    status.textContent = "None: every report and receipt so far verified.";
    return;
  }
  const rows = body.data.map((failure) => {
    const tr = document.createElement("tr");
    const when = new Date(failure.created_at).toISOString().slice(0, 16).replace("T", " ") + " UTC";
    for (const text of [when, failure.kind, failure.reason, failure.user_id ?? "—", failure.peer_id, failure.detail]) {
      const td = document.createElement("td");
      td.textContent = String(text);
      tr.append(td);
    }
    return tr;
  });
  table.tBodies[0].replaceChildren(...rows);
  table.hidden = false;
  status.textContent = `${body.count} refused ${body.count === 1 ? "item" : "items"}.`;
})();
