"""Peer tools measured or checked next to anybit (optional extras)."""
