"""Short-lived JWTs for cloud applications (OAuth2 client-credentials grant), signed HS256 with the hub's key.

A token names its subaccount in ``sub`` and is meant for the SOCKS5 proxy (``aud``). This module must not read
files or sockets; the key is handed in.
"""

from __future__ import annotations

import time
import uuid

import jwt

from postbridge.errors import AuthenticationError

AUDIENCE = "postbridge-socks"
ISSUER = "postbridge-hub"
DEFAULT_TTL = 3600


def issue(key: bytes, subaccount: str, *, ttl: int = DEFAULT_TTL, now: float | None = None) -> str:
    """A signed token for ``subaccount`` valid for ``ttl`` seconds."""
    issued = int(now if now is not None else time.time())
    claims = {
        "sub": subaccount,
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": issued,
        "exp": issued + ttl,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm="HS256")


def verify(key: bytes, token: str) -> str:
    """Return the subaccount of a valid token. Raises AuthenticationError saying why it is not valid."""
    hint = "fetch a new token from the hub's token URL (POST /oauth/token, client-credentials grant)"
    try:
        claims = jwt.decode(token, key, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    except jwt.ExpiredSignatureError as exc:
        raise AuthenticationError("the JWT has expired", hint=hint) from exc
    except jwt.InvalidSignatureError as exc:
        raise AuthenticationError("the JWT was not signed by this hub", hint=hint) from exc
    except jwt.InvalidTokenError as exc:
        raise AuthenticationError(f"the JWT is not valid: {exc}", hint=hint) from exc
    subaccount = claims.get("sub")
    if not isinstance(subaccount, str) or not subaccount:
        raise AuthenticationError("the JWT names no subaccount", hint=hint)
    return subaccount
