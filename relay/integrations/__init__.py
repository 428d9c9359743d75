"""Integrations: the OpenAI-Realtime-compatible socket (``/v1/realtime``) that records what it relays."""
