"""`hivewire doctor` against a volunteer that is training: the link test measures the throughput to it."""

import json
import os
import signal
import subprocess

import httpx
import pytest

from tests.client.e2e_training.conftest import HIVEWIRE, SLUG, Volunteers
from tests.conftest import new_user
from tests.support import LOOPBACK

pytestmark = pytest.mark.slow

DOCTOR_TIMEOUT_S = 120.0  # the doctor's own stages end within about a minute on two busy cores


def test_the_doctor_probes_a_training_volunteer_which_goes_on_training(
    volunteers: Volunteers, http: httpx.Client, tmp_path: os.PathLike[str]
) -> None:
    """The volunteer's network side answers the doctor's probe (the doctor is not in the run's progress
    view, so no round reads its payloads), the doctor prints a measured rate, and training goes on."""
    trainer = volunteers.join("erin", "--max-epochs", "1000", "--batch-size", "8")
    trainer.wait_for(" | loss ")
    user = new_user(http, "doc")  # type: ignore[arg-type]
    env = {
        **os.environ,
        "HIVEWIRE_HOME": str(tmp_path / "doctor-home"),
        "HIVEWIRE_SERVER": volunteers.server.url,
        "HIVEWIRE_TOKEN": user.token,
        "OMP_NUM_THREADS": "1",
    }
    command = [HIVEWIRE, "doctor", f"{volunteers.server.url}/runs/{SLUG}", "--json", "--host-address", LOOPBACK]
    doctor = subprocess.run(command, env=env, capture_output=True, text=True, timeout=DOCTOR_TIMEOUT_S)
    report = json.loads(doctor.stdout)
    peer = next(check for check in report["checks"] if check["step"] == "peer")
    assert peer["status"] == "ok", (peer, doctor.stderr[-2000:])
    details = peer["details"]
    assert details["probe_complete"] and details["probe_bytes"] > 0, peer
    assert details["throughput_mb_s"] > 0, peer
    assert "MB/s" in peer["summary"], peer
    epochs = sum(" | loss " in line for line in trainer.lines)
    trainer.wait_for(" | loss ", times=epochs + 1)  # still training after the probe
    assert trainer.process is not None
    trainer.process.send_signal(signal.SIGINT)
    assert trainer.wait() == 130, trainer.output[-3000:]
    assert "Traceback" not in trainer.output, trainer.output[-3000:]
