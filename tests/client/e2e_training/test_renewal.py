"""Certificate renewal (session/renewal.py) against the real server with the shortest certificate lifetime (60 s).

The renewer's clock runs half a lifetime ahead, so renewal is due at once instead of after 30 s of waiting;
the server, on the real clock, renews. The renewed certificate is verified, handed on, and accepted by the
server as a reporter's bearer.
"""

import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivewire.api import HivewireAPI
from hivewire.errors import CertificateError
from hivewire.identity import CertificateVerifier, PeerIdentity
from hivewire.reporter import LinkTypes, Reporter, ReporterConfig
from hivewire.session.renewal import CertificateRenewer
from tests.client._fakes import raw_public
from tests.client.e2e_training.conftest import JOIN_TIMEOUT_S, SLUG, Volunteer, Volunteers
from tests.client.live_server import Server
from tests.conftest import Account, new_user

LIFETIME_S = 60  # the server's minimum
RENEWAL_TIMEOUT_S = 20.0


@pytest.fixture
def server(sqlite_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("CERTIFICATE_LIFETIME_SECONDS", str(LIFETIME_S))
    database = tmp_path / "hivewire.db"
    database.write_bytes(sqlite_template.read_bytes())
    running = Server(database, tmp_path / "server.log")
    running.start()
    try:
        yield running
    finally:
        running.stop()


def new_identity() -> PeerIdentity:
    key = Ed25519PrivateKey.generate()
    return PeerIdentity(private_key=key, public_key_raw=raw_public(key))


def test_a_certificate_is_renewed_before_expiry_and_the_new_one_is_accepted(
    server: Server, http: httpx.Client, organizer: Account, tmp_path: Path
) -> None:
    volunteer = new_user(http, "vera")  # type: ignore[arg-type]
    identity = new_identity()
    api = HivewireAPI(server.url, volunteer.token)
    verifier = CertificateVerifier(server.url, http=api.http)
    first = verifier.verify(api.join(SLUG, identity.peer_key).certificate, run=SLUG)
    assert (first.expires_at - first.issued_at).total_seconds() == LIFETIME_S
    handed: list[str] = []
    renewer = CertificateRenewer(
        api,
        run=SLUG,
        identity=identity,
        verifier=verifier,
        current=first,
        on_renewed=handed.append,
        clock=lambda: datetime.now(UTC) + timedelta(seconds=LIFETIME_S / 2 + 1),
    )
    renewer.start()
    try:
        deadline = datetime.now(UTC) + timedelta(seconds=RENEWAL_TIMEOUT_S)
        while not handed and datetime.now(UTC) < deadline:
            time.sleep(0.05)
    finally:
        renewer.close()
    assert len(handed) >= 1, (tmp_path / "server.log").read_text()[-2000:]
    assert renewer.certificate() == handed[-1] != first.token
    checker = CertificateVerifier(server.url)
    renewed = checker.verify(handed[-1], run=SLUG)
    checker.close()
    assert renewed.peer_id == identity.peer_id and renewed.jti != first.jti
    assert renewed.expires_at >= first.expires_at

    # the server takes the renewed certificate as the bearer of this peer's reports
    reporter = Reporter(
        server.url, SLUG, identity, renewer.certificate, ReporterConfig(queue_path=tmp_path / "reports.jsonl")
    )
    reporter.report(epoch=0, samples=8, loss=2.0, samples_per_second=4.0, link_types=LinkTypes(host=1))
    result = reporter.close(timeout_s=10)
    assert len(result.accepted) == 1 and result.error is None


def test_a_renewed_certificate_for_another_key_is_refused(
    server: Server, http: httpx.Client, organizer: Account
) -> None:
    """The server's answer is checked like a join's: a certificate for another peer key is not taken."""
    volunteer = new_user(http, "walt")  # type: ignore[arg-type]
    mine, other = new_identity(), new_identity()
    with HivewireAPI(server.url, volunteer.token) as api:
        verifier = CertificateVerifier(server.url, http=api.http)
        current = verifier.verify(api.join(SLUG, other.peer_key).certificate, run=SLUG)  # not this machine's key
        renewer = CertificateRenewer(
            api, run=SLUG, identity=mine, verifier=verifier, current=current, on_renewed=pytest.fail
        )
        with pytest.raises(CertificateError, match="another peer key"):
            renewer.renew()
        assert renewer.certificate() == current.token


def _epochs_after(volunteer: Volunteer, marker: str) -> int:
    """Epoch lines the volunteer printed after its first line holding ``marker``."""
    lines = list(volunteer.lines)
    start = next((n for n, line in enumerate(lines) if marker in line), len(lines))
    return sum(1 for line in lines[start:] if line.startswith("epoch "))


@pytest.mark.slow
def test_a_session_longer_than_half_a_certificate_renews_it_and_trains_on(
    volunteers: Volunteers, tmp_path: Path
) -> None:
    """Two volunteers on 60 s certificates: each renews after ~30 s, its network process takes the new one, and
    both keep averaging (rounds after the renewal) until Ctrl-C, then deliver their reports and receipts."""
    args = ("--max-epochs", "100000", "--batch-size", "8", "--verbose")
    pair = [volunteers.join(name, *args) for name in ("alice", "bob")]
    deadline = time.monotonic() + LIFETIME_S + JOIN_TIMEOUT_S
    for volunteer in pair:
        volunteer.wait_for("renewed the certificate; valid until", timeout_s=max(1.0, deadline - time.monotonic()))
        volunteer.wait_for("using the renewed certificate from now on", timeout_s=max(1.0, deadline - time.monotonic()))
    while not all(_epochs_after(v, "using the renewed certificate") >= 2 for v in pair):
        assert time.monotonic() < deadline, "\n".join(v.output[-3000:] for v in pair)
        time.sleep(0.2)
    for volunteer in pair:
        assert volunteer.process is not None
        volunteer.process.send_signal(signal.SIGINT)
    assert [volunteer.wait() for volunteer in pair] == [130, 130]
    for volunteer in pair:
        assert "round receipts delivered" in volunteer.output and "Goodbye." in volunteer.output
        assert "could not renew" not in volunteer.output
    log = (tmp_path / "server.log").read_text()
    assert log.count(f"POST /api/runs/{SLUG}/renew 200") >= 2, log[-3000:]
