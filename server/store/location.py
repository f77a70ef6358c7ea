"""What `--db` names: a SQLite file path, or a PostgreSQL URL; and how to show it without its password."""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from pathlib import Path

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
"""The URL forms libpq accepts."""
HIDDEN = "***"
_PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


def is_postgres_url(db: str) -> bool:
    return db.lower().startswith(POSTGRES_SCHEMES)


def shown(db: str) -> str:
    """`db` as logs and messages may show it: a URL's password (in its user info or its `password`
    parameter) replaced by ***. A file path is shown as it is."""
    if not is_postgres_url(db):
        return db
    scheme, rest = db.split("://", 1)
    authority, slash, path = rest.partition("/")
    user_info, at, hosts = authority.rpartition("@")
    if at and ":" in user_info:
        authority = f"{user_info.split(':', 1)[0]}:{HIDDEN}@{hosts}"
    return _PASSWORD_PARAMETER.sub(rf"\g<1>{HIDDEN}", f"{scheme}://{authority}{slash}{path}")


def secrets(db: str) -> list[str]:
    """The password a URL carries, as written and percent-decoded: what must never be shown."""
    if not is_postgres_url(db):
        return []
    rest = db.split("://", 1)[1]
    authority = rest.partition("/")[0]
    user_info, at, _ = authority.rpartition("@")
    found = [user_info.split(":", 1)[1]] if at and ":" in user_info else []
    found += [match.group(0).split("=", 1)[1] for match in _PASSWORD_PARAMETER.finditer(rest)]
    found = [secret for secret in found if secret]
    return sorted({*found, *(urllib.parse.unquote(secret) for secret in found)}, key=len, reverse=True)


def scrubbed(text: str, db: str) -> str:
    """`text` (an error message from the driver) with the URL's password, in any form, replaced by ***."""
    for secret in secrets(db):
        text = text.replace(secret, HIDDEN)
    return text


def user_cache(db: str) -> Path:
    """The default dataset cache of servers on the PostgreSQL database `db`: a directory in the user's
    cache (XDG_CACHE_HOME, else ~/.cache) named by the database's address, so that servers on the same
    machine and database share it, and servers on other databases never sweep each other's entries."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    address = urllib.parse.urlsplit(shown(db))
    hosts = address.netloc.rpartition("@")[2]
    key = hashlib.sha256(f"{hosts}{address.path}".encode()).hexdigest()[:16]
    return base / "chainrule" / "datasets" / key
