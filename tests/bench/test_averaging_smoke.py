"""bench/averaging.py runs end to end in its quickest mode and prints every row it promises.

Runs the script as a user would (a subprocess, tiny tensors, one round), then reads its table: every row is
there, with a time wherever the path is built (tuned WebRTC and direct TLS print ``n/a`` only while their
modules are missing), the peers agreed on their results (the script fails otherwise), and on a machine that
can build the emulated WAN (root), its rows ran through the delay line and no namespace was left behind.
Times are printed, never checked.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "averaging.py"
RUN_TIMEOUT_S = 300  # the run takes ~30 s on an idle 2-core machine; this only stops a hung one
LABELS = {"gloo": "gloo", "tcp": "tcp", "untuned": "webrtc untuned", "tuned": "webrtc tuned", "direct": "direct TLS"}
ROW = re.compile(
    r"^(?P<network>loopback|wan)\s+(?P<peers>\d+)\s+(?P<size>[\d.]+)MB\s+(?P<codec>none|fp16|int8)\s+"
    r"(?P<path>gloo|tcp|webrtc untuned|webrtc tuned|direct TLS)(?: x(?P<stripes>\d+))?\s+(?P<rest>.*)$",
    re.MULTILINE,
)

pytestmark = pytest.mark.slow


def _namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in listed.splitlines() if line.startswith("hwbench-")}


def _wan_possible() -> bool:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import _wan  # bench/ is not a package: its helper is imported by path, as the script does
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return _wan.unavailable() is None


def test_quick_run_prints_every_row() -> None:
    wan = _wan_possible()
    before = _namespaces() if wan else set()
    argv = [sys.executable, str(SCRIPT), "--quick", "--peers", "2", "--sizes-mb", "0.1", "--link-mb", "0.1"]
    argv += ["--wan-mb", "0.1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=ROOT, check=False)
    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, report
    assert "FAILED" not in done.stderr, report

    rows = {
        (m["network"], m["codec"], m["path"] + (f" x{m['stripes']}" if m["stripes"] else "")): m["rest"].strip()
        for m in ROW.finditer(done.stdout)
    }
    built = {
        "webrtc untuned": True,
        "webrtc tuned": importlib.util.find_spec("hivewire.mesh.tuning") is not None,
        "direct TLS": importlib.util.find_spec("hivewire.mesh.direct") is not None,
    }
    expected = [("loopback", "none", "gloo")] + [("loopback", codec, "tcp") for codec in ("none", "fp16", "int8")]
    striped = [f"{path} x2" for path, ok in built.items() if ok and path.startswith("webrtc")]  # --stripes 2
    expected += [("loopback", codec, path) for path in (*built, *striped) for codec in ("none", "int8")]
    expected += [("wan", "none", path) for path in ("gloo", "tcp", *built, *striped)]
    for key in expected:
        assert key in rows, f"no row for {key}\n{report}"
        network, _, path = key
        measured = (network == "loopback" or wan) and built.get(path.removesuffix(" x2"), True)
        if measured:
            assert re.match(r"^\d+\.\d{3}\s", rows[key]), f"{key} has no time: {rows[key]!r}\n{report}"
        else:
            assert rows[key].startswith("n/a"), f"{key} should say why it is missing: {rows[key]!r}\n{report}"
    assert re.search(r"load average \d+\.\d", done.stdout), report

    if wan:
        delayed = re.search(r"delay line: (\d+) packets delayed", done.stdout)
        assert delayed is not None and int(delayed.group(1)) > 0, f"no traffic went through the delay line\n{report}"
        assert "delay line 0" in done.stdout, f"the delay line dropped packets\n{report}"
        assert _namespaces() <= before, f"namespaces left behind: {sorted(_namespaces() - before)}"
