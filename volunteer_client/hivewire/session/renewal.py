"""Certificate renewal for long sessions: a thread in the trainer process renews before expiry.

Peer certificates are short-lived (CERTIFICATE_LIFETIME_SECONDS, an hour by default) so that a ban takes
effect soon. A session that outlives its certificate would be refused by signaling, by every peer it offers
a link to, and by the server's report endpoints. Why the trainer process renews, not the network process:
renewing takes the volunteer's API token, and keeping that token out of the process that parses every peer's
bytes costs nothing. The renewed certificate is verified here (server key, run, our own key) and handed to
the network process over the Pipe (`Renewed`), which signs offers, progress and receipts with it from then on;
the reporter reads it through `certificate()`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import ValidationError

from hivewire.api import HivewireAPI, JoinResponse
from hivewire.errors import APIError, CertificateError, HivewireError, InvalidResponse
from hivewire.identity import CertificateVerifier, PeerCertificate, PeerIdentity

logger = logging.getLogger(__name__)

RENEW_AT = 0.5  # renew once this fraction of the certificate's lifetime has passed
RETRY_S = 30.0  # after a failed renewal, try again this often (at most a quarter of what remains)
MIN_WAIT_S = 1.0  # never poll the server faster than this


class CertificateRenewer:
    """Keeps this peer's certificate fresh; `certificate()` is the current one (read from any thread)."""

    def __init__(
        self,
        api: HivewireAPI,
        *,
        run: str,
        identity: PeerIdentity,
        verifier: CertificateVerifier,
        current: PeerCertificate,
        on_renewed: Callable[[str], None],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._api = api
        self._run = run
        self._identity = identity
        self._verifier = verifier
        self._current = current
        self._on_renewed = on_renewed
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.renewals = 0

    def certificate(self) -> str:
        return self._current.token

    @property
    def expires_at(self) -> datetime:
        return self._current.expires_at

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_forever, name="hivewire-renewer", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread (a renewal under way finishes: at most the API's request timeout) and close the API."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._api.close()

    def _wait_s(self) -> float:
        current, now = self._current, self._clock()
        lifetime = (current.expires_at - current.issued_at).total_seconds()
        due = current.issued_at.timestamp() + RENEW_AT * lifetime
        return max(MIN_WAIT_S, due - now.timestamp())

    def _run_forever(self) -> None:
        wait_s = self._wait_s()
        while not self._stop.wait(wait_s):
            try:
                self.renew()
                wait_s = self._wait_s()
            except HivewireError as exc:
                remaining = (self._current.expires_at - self._clock()).total_seconds()
                wait_s = max(MIN_WAIT_S, min(RETRY_S, remaining / 4))
                level = logging.ERROR if remaining < 2 * RETRY_S else logging.WARNING
                logger.log(
                    level,
                    "could not renew the certificate (expires in %.0f s), retrying in %.0f s: %s",
                    remaining,
                    wait_s,
                    exc,
                )

    def renew(self) -> PeerCertificate:
        """Renew now: ask the server, verify the answer, hand it on; HivewireError when any step fails."""
        path = f"/api/runs/{self._run}/renew"
        try:
            body = self._api.request("POST", path, json_body={"certificate": self._current.token})
        except APIError as exc:
            if exc.code not in ("expired_certificate", "bad_certificate", "unknown_peer"):
                raise
            # Ours is no longer renewable (expired while the server was away): join again with the same key.
            logger.warning("the server cannot renew our certificate (%s); joining the run again", exc.code)
            body = self._api.request(
                "POST", f"/api/runs/{self._run}/join", json_body={"peer_key": self._identity.peer_key}
            )
        try:
            joined = JoinResponse.model_validate(body)
        except ValidationError as exc:
            raise InvalidResponse(f"POST {path}: the answer breaks the protocol: {exc.errors()[0]['msg']}") from exc
        certificate = self._verifier.verify(joined.certificate, run=self._run)
        if certificate.peer_key != self._identity.public_key_raw or certificate.peer_id != self._identity.peer_id:
            raise CertificateError("the server certified another peer key than this machine's")
        self._current = certificate
        self.renewals += 1
        self._on_renewed(certificate.token)
        logger.info("renewed the certificate; valid until %s", f"{certificate.expires_at:%H:%M:%S} UTC")
        return certificate
