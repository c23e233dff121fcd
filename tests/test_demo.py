"""scripts/demo.py end to end: server, device-grant sign-ins, three volunteers, falling loss, a filled leaderboard,
no child left."""

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support import free_port

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"
EPOCHS = 4
DEMO_TIMEOUT_S = 120.0  # --minutes 1, then at most ~20 s for the volunteers to leave
ROW = re.compile(r"^\s+\d+\s+(?P<name>\w+)\s+(?P<verified>\d+)\s+\d+\s+\d+\s+\d+$", re.MULTILINE)
LEFT = re.compile(r"Left run tiny-lm-demo at epoch (?P<epoch>\d+) .*\(loss (?P<first>[0-9.]+) -> (?P<last>[0-9.]+)\)")


def processes_with(marker: str) -> list[int]:
    """Pids whose environment holds `marker` (every child of the demo inherits the test's environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass  # gone meanwhile, or not ours
    return found


def test_the_demo_trains_three_volunteers_and_leaves_no_process(tmp_path: Path) -> None:
    marker = f"HIVEWIRE_DEMO_TEST={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    args = [sys.executable, str(DEMO), "--minutes", "1", "--port", str(free_port()), "--home", str(tmp_path)]
    args += ["--target-batch", "512", "--max-epochs", str(EPOCHS), "--every", "2"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Dashboard: http://127.0.0.1:" in output
    for name in ("ada", "brook", "cyril"):
        assert f"{name}: `hivewire login" in output, output
        assert "Signed in to http://127.0.0.1:" in (tmp_path / f"{name}.log").read_text()
    assert output.count("Goodbye.") == 3, output  # the three volunteers joined, trained and left the run
    falling = [m for m in LEFT.finditer(output) if int(m["epoch"]) >= 1 and float(m["last"]) < float(m["first"])]
    assert falling, output
    assert processes_with(marker) == [], output
    # the leaderboard the server counted, printed at the end: every volunteer with verified samples
    board = output[output.index("Leaderboard of tiny-lm-demo") :]
    rows = {match["name"]: int(match["verified"]) for match in ROW.finditer(board)}
    assert rows.keys() == {"ada", "brook", "cyril"}, board
    assert all(verified > 0 for verified in rows.values()), board
