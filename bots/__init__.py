"""Frontends: console now; Discord, Telegram and web build on the same client (shared/client.py)."""
