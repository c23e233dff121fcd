"""Signaling: the authenticated WebSocket to the run's server, its messages, and signed offers and answers."""

from hivewire.signaling.client import CertificateSource, Incoming, SignalingClient
from hivewire.signaling.errors import (
    SignalingAuthError,
    SignalingBanned,
    SignalingError,
    SignalingProtocolError,
    SignalingRejected,
    SignalingUnavailable,
)
from hivewire.signaling.messages import (
    ErrorMessage,
    Presence,
    Relay,
    Signal,
    SignalKind,
    Welcome,
    decode_server_message,
    encode_client_message,
)
from hivewire.signaling.settings import Backoff, SignalingSettings
from hivewire.signaling.signed import DescriptionVerifier, VerifiedDescription, fingerprints_from_sdp, sign_description

__all__ = [
    "Backoff",
    "CertificateSource",
    "DescriptionVerifier",
    "ErrorMessage",
    "Incoming",
    "Presence",
    "Relay",
    "Signal",
    "SignalKind",
    "SignalingAuthError",
    "SignalingBanned",
    "SignalingClient",
    "SignalingError",
    "SignalingProtocolError",
    "SignalingRejected",
    "SignalingSettings",
    "SignalingUnavailable",
    "VerifiedDescription",
    "Welcome",
    "decode_server_message",
    "encode_client_message",
    "fingerprints_from_sdp",
    "sign_description",
]
