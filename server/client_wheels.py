"""The volunteer client's wheels this server offers, so the join page's `pip install` works against any
self-hosted server, whether or not the client is on a package index.

The directory belongs to the operator (CLIENT_WHEEL_DIR; the server image fills it at build time). It is read
again on each request, so a newer wheel dropped in needs no restart. Only regular files directly inside it
whose names are `hivewire` wheel filenames are listed or served: a name from a request is only ever compared
with that listing, never joined to a path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

log = logging.getLogger("hivewire.downloads")

# PEP 427: {distribution}-{version}(-{build tag})?-{python tag}-{abi tag}-{platform tag}.whl, where the
# version's own hyphens became underscores. Bounded lengths keep a hostile directory from bloating answers.
WHEEL_NAME = re.compile(
    r"^hivewire-(?P<version>[0-9][A-Za-z0-9_.!+]{0,63})"
    r"(?:-[0-9][A-Za-z0-9_.]{0,31})?"
    r"-[A-Za-z0-9_.]{1,32}-[A-Za-z0-9_.]{1,32}-[A-Za-z0-9_.]{1,64}\.whl$"
)
# The pure-Python client is well under 1 MB; a much larger file is not one we built.
MAX_WHEEL_BYTES = 64 * 1024 * 1024
HASH_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ClientWheel:
    """One servable wheel: its name (also its URL path segment), parsed version, size and content hash."""

    filename: str
    version: Version
    path: Path
    size: int
    sha256: str
    modified_ns: int


class ClientWheels:
    """The wheels in one directory (or none when `directory` is None), newest version first.

    Thread-safe: sync routes call it from the threadpool. Hashes are cached per (size, mtime, inode), so a
    page view costs a directory listing, not a re-read of every wheel.
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._hashes: dict[str, tuple[tuple[int, int, int], str]] = {}
        self._warned: set[str] = set()

    def available(self) -> list[ClientWheel]:
        """Every servable wheel, newest version first."""
        if self.directory is None:
            return []
        try:
            entries = list(os.scandir(self.directory))
        except OSError as exc:
            self._warn_once(str(self.directory), "cannot list CLIENT_WHEEL_DIR %s: %s", self.directory, exc)
            return []
        wheels = [wheel for entry in entries if (wheel := self._wheel(entry)) is not None]
        # Newest version first; for one version, the most recently built file.
        wheels.sort(key=lambda wheel: (wheel.version, wheel.modified_ns), reverse=True)
        return wheels

    def newest(self) -> ClientWheel | None:
        wheels = self.available()
        return wheels[0] if wheels else None

    def get(self, filename: str) -> ClientWheel | None:
        """The listed wheel with exactly this name, or None (also for any name that is not a wheel name)."""
        if not WHEEL_NAME.fullmatch(filename):
            return None
        return next((wheel for wheel in self.available() if wheel.filename == filename), None)

    def _wheel(self, entry: os.DirEntry[str]) -> ClientWheel | None:
        match = WHEEL_NAME.fullmatch(entry.name)
        if match is None:
            return None
        # Symbolic links are not followed: what is served is what lies in the directory itself.
        if not entry.is_file(follow_symlinks=False):
            self._warn_once(entry.name, "not serving %s: not a regular file", entry.path)
            return None
        try:
            version = Version(match["version"].replace("_", "-"))
        except InvalidVersion:
            self._warn_once(entry.name, "not serving %s: %r is not a version", entry.path, match["version"])
            return None
        stat = entry.stat(follow_symlinks=False)
        if stat.st_size > MAX_WHEEL_BYTES:
            self._warn_once(entry.name, "not serving %s: larger than %d bytes", entry.path, MAX_WHEEL_BYTES)
            return None
        digest = self._sha256(entry.name, Path(entry.path), (stat.st_size, stat.st_mtime_ns, stat.st_ino))
        if digest is None:
            return None
        return ClientWheel(entry.name, version, Path(entry.path), stat.st_size, digest, stat.st_mtime_ns)

    def _sha256(self, name: str, path: Path, identity: tuple[int, int, int]) -> str | None:
        with self._lock:
            cached = self._hashes.get(name)
        if cached is not None and cached[0] == identity:
            return cached[1]
        digest = hashlib.sha256()
        try:
            with path.open("rb") as file:
                while chunk := file.read(HASH_CHUNK_BYTES):
                    digest.update(chunk)
        except OSError as exc:
            self._warn_once(name, "not serving %s: %s", path, exc)
            return None
        with self._lock:
            self._hashes[name] = (identity, digest.hexdigest())
        return digest.hexdigest()

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        """An operator needs each problem once, not once per page view."""
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning(message, *args)


def install_command(base_url: str, wheel: ClientWheel | None) -> str:
    """The join page's first command: the served wheel, pinned by hash (pip checks a `#sha256=` fragment), or
    the package index when this server serves none. Double quotes work in POSIX shells, PowerShell and cmd."""
    if wheel is None:
        return "pip install hivewire"
    return f'pip install "{base_url}/downloads/{wheel.filename}#sha256={wheel.sha256}"'
