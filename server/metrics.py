"""Prometheus metrics of this server process, in the text exposition format (version 0.0.4), written here
rather than through a library: a few counters and one gauge need no registry. Each replica exposes its own."""

from __future__ import annotations

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    """A monotonically growing count per combination of label values."""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.help_text = help_text
        self.labels = labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        if amount:
            self.values[label_values] = self.values.get(label_values, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} counter"]
        for values, count in sorted(self.values.items()):
            pairs = ",".join(f'{label}="{_escape(value)}"' for label, value in zip(self.labels, values, strict=True))
            lines.append(f"{self.name}{{{pairs}}} {count:g}")
        return lines


class ServerMetrics:
    """The process's counters; the app owns one (app.state.metrics)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "hivewire_http_requests_total",
            "HTTP requests by route template, method and status.",
            ("route", "method", "status"),
        )
        self.reports = Counter("hivewire_reports_total", "Progress reports by outcome.", ("outcome",))
        self.receipts = Counter("hivewire_receipts_total", "Round receipts by outcome.", ("outcome",))

    def render(self, *, signaling_peers: int) -> str:
        lines = [
            *self.requests.render(),
            *self.reports.render(),
            *self.receipts.render(),
            "# HELP hivewire_signaling_peers Peers connected to this replica's signaling.",
            "# TYPE hivewire_signaling_peers gauge",
            f"hivewire_signaling_peers {signaling_peers}",
        ]
        return "\n".join(lines) + "\n"
