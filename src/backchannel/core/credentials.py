"""Identifiers and secrets: generation, hashing and constant-time checks.

Secrets here are long random strings (at least 128 bits), not passwords, so one SHA-256 is
enough to make a leaked database useless; a slow password hash would only cost CPU on every
request. Plaintext secrets are returned once at creation and never stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

# Device ids in the wild: MAC addresses, numbers, short names (COMPAT.md).
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_APP_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def new_app_id() -> str:
    """A new application id: 20 hex characters, the shape Cometa apps had."""
    return secrets.token_hex(10)


def new_secret() -> str:
    """A new application secret: 40 hex characters (160 bits)."""
    return secrets.token_hex(20)


def new_key() -> str:
    """A new device key or admin token: 43 URL-safe characters (256 bits)."""
    return secrets.token_urlsafe(32)


def new_tunnel_token() -> str:
    """A new Socket2me token: 48 URL-safe characters (288 bits), the original's length."""
    return secrets.token_urlsafe(36)


def hash_secret(secret: str) -> str:
    """The stored form of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def check_secret(secret: str, stored_hash: str) -> bool:
    """Compare ``secret`` with a stored hash in constant time."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def valid_device_id(device_id: str) -> bool:
    """True for 1-128 characters of letters, digits and ``._:@-``, starting alphanumeric."""
    return _DEVICE_ID.match(device_id) is not None


def valid_app_id(app_id: str) -> bool:
    """True for a well-formed application id."""
    return _APP_ID.match(app_id) is not None
