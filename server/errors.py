"""Domain errors, raised by plain functions that know nothing of HTTP. The API layer (api/errors.py) alone
turns them into status codes.

    DomainError
    ├── InvalidInput        the request is well-formed JSON but its content is not acceptable
    ├── Unauthenticated     no valid credentials
    ├── Forbidden           authenticated, but not allowed
    │   └── Banned          banned from this run
    ├── NotFound
    └── Conflict            it exists already (duplicate email, slug, peer key of another user)
"""

from __future__ import annotations


class DomainError(Exception):
    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidInput(DomainError):
    code = "invalid_input"


class Unauthenticated(DomainError):
    code = "unauthenticated"


class Forbidden(DomainError):
    code = "forbidden"


class Banned(Forbidden):
    code = "banned"


class NotFound(DomainError):
    code = "not_found"


class Conflict(DomainError):
    code = "conflict"
