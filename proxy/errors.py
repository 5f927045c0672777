"""The exception hierarchy; each error knows the HTTP status it maps to."""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the sidecar raises on purpose."""

    status: int = 500
    code: str = "internal_error"


class ConfigError(ProxyError, ValueError):
    """A configuration file is invalid; `problems` holds every (path, reason)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        """Return one `file: path: reason` line per problem."""
        return [
            f"{self.source}: {path}: {reason}" if path else f"{self.source}: {reason}"
            for path, reason in self.problems
        ]


class BadRequest(ProxyError):
    """The request itself is unacceptable (bad key, bad header)."""

    status = 400
    code = "bad_request"


class NotFound(ProxyError):
    """No route, no object, or a key that would leave its storage."""

    status = 404
    code = "not_found"


class NotReady(NotFound):
    """The media id exists but its processing status may not be served (SPEC §7)."""

    code = "not_ready"


class MethodNotAllowed(ProxyError):
    """Only GET and HEAD are served on media routes."""

    status = 405
    code = "method_not_allowed"


class PreconditionFailed(ProxyError):
    """The object changed under the request (If-Match on a re-open failed)."""

    status = 412
    code = "precondition_failed"


class Overloaded(ProxyError):
    """Admission control refused the request."""

    status = 503
    code = "over_capacity"

    def __init__(self, message: str = "", retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StorageError(ProxyError):
    """The storage refused the request or is misconfigured."""

    status = 502
    code = "storage_error"

    def __init__(self, message: str, *, storage: str = "", key: str = "") -> None:
        super().__init__(message)
        self.storage = storage
        self.key = key


class StorageTimeout(StorageError, TimeoutError):
    """The storage did not answer in time."""

    status = 504
    code = "storage_timeout"


class ObjectChanged(StorageError):
    """The object changed between its stat and its read; the caller may retry once."""

    code = "object_changed"


class Forbidden(ProxyError):
    """Access control refused the request; `reason` is shown to the client (no secrets)."""

    status = 403
    code = "forbidden"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DatabaseUnavailable(ProxyError):
    """The database cannot be reached, or no pool connection came within acquire_timeout."""

    status = 503
    code = "database_unavailable"


class DatabaseTimeout(DatabaseUnavailable):
    """The server cancelled a query at statement_timeout (pitfalls P8)."""

    code = "database_timeout"


class QueryRejected(ProxyError):
    """The database refused the query itself: syntax, unknown table or column, parameters."""

    code = "database_query_rejected"


class UpstreamUnavailable(StorageError):
    """The backend of an upstream route refused or dropped the connection."""

    code = "upstream_unavailable"


class UpstreamTimeout(StorageTimeout):
    """The backend sent no response headers within response_timeout."""

    code = "upstream_timeout"


class RequestTooLarge(ProxyError):
    """A request body over the upstream's max_body_size."""

    status = 413
    code = "request_too_large"
