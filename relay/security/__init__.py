"""Credentials: Parley's own tokens, OIDC bearer tokens, API keys."""
