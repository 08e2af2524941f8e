"""Who may call the admin routes (``/admin/...``): a bearer token, compared by its sha256.

The token comes from an environment variable (``admin_token_env``, default
``TIDAL_ADMIN_TOKEN``) where the application is built; only its digest enters the
``ClusterConfig``. With no token the admin routes are off (403 saying how to turn them on)
unless the deployment says ``insecure_admin``. User routes never ask for a token.
"""

from __future__ import annotations

import hashlib
import hmac

from cluster.config import ClusterConfig
from cluster.errors import ApiError


def admin_refusal(config: ClusterConfig, authorization: str | None) -> ApiError | None:
    """None when a request with this ``Authorization`` header may use the admin routes."""
    if config.insecure_admin:
        return None
    if config.admin_token_sha256 is None:
        return ApiError(
            403,
            "the admin API is off: start tidal with the admin token in TIDAL_ADMIN_TOKEN (or the "
            "variable named by admin_token_env), or with --insecure-admin on a trusted network",
            code="admin_disabled",
        )
    scheme, _, token = (authorization or "").partition(" ")
    digest = hashlib.sha256(token.strip().encode()).hexdigest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(digest, config.admin_token_sha256):
        return ApiError(
            401,
            "admin routes need 'Authorization: Bearer <token>' with the server's admin token",
            code="unauthorized",
        )
    return None
