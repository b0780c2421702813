"""DSN parsing and masking, with the driver's own conninfo functions (never f-strings)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from psycopg2.extensions import make_dsn, parse_dsn

from .errors import ConfigurationError

__all__ = ["MASK", "NodeDSN", "mask_dsn", "parse"]

MASK = "***"


@dataclass(frozen=True)
class NodeDSN:
    """A parsed libpq connection string: every option passes through to the driver."""

    params: Mapping[str, str]

    @property
    def conninfo(self) -> str:
        """The libpq keyword string, password included: for drivers only, never for logs."""
        return str(make_dsn(**self.params))

    @property
    def masked(self) -> str:
        """The keyword string with the password replaced by ``***``."""
        shown = dict(self.params)
        if "password" in shown:
            shown["password"] = MASK
        return str(make_dsn(**shown))

    @property
    def password(self) -> str | None:
        return self.params.get("password")

    @property
    def host(self) -> str:
        return self.params.get("host", "localhost")

    @property
    def port(self) -> int:
        try:
            return int(self.params.get("port", "5432").split(",")[0])
        except ValueError:
            return 5432

    def __repr__(self) -> str:
        return f"NodeDSN({self.masked!r})"


def parse(dsn: str, *, option: str = "dsn") -> NodeDSN:
    """Parse a libpq URL or keyword string; a malformed one raises ``ConfigurationError``."""
    if not isinstance(dsn, str) or not dsn.strip():
        raise ConfigurationError(
            f"{option}: expected a libpq DSN string, got {type(dsn).__name__}", option=option
        )
    try:
        params = {str(k): str(v) for k, v in parse_dsn(dsn).items()}
    except Exception:  # psycopg2.ProgrammingError: its text may echo the password
        # ``from None``: the driver's message can quote the DSN, password included.
        raise ConfigurationError(
            f"{option}: malformed DSN {_mask_raw(dsn)!r}", option=option
        ) from None
    for port in params.get("port", "5432").split(","):
        if not port.strip().isdigit() or not 0 < int(port) < 65536:
            shown = NodeDSN(params).masked
            raise ConfigurationError(
                f"{option}: port {port!r} is not a TCP port in DSN {shown!r}", option=option
            )
    return NodeDSN(params)


def mask_dsn(dsn: str) -> str:
    """Mask the password of a DSN that may not even parse (for error messages and logs)."""
    try:
        return parse(dsn).masked
    except ConfigurationError:
        return _mask_raw(dsn)


def _mask_raw(dsn: str) -> str:
    masked = re.sub(r"(://[^:/@]*:)[^@]*@", rf"\g<1>{MASK}@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", rf"\g<1>{MASK}", masked)
