"""Registrations of the sub-commands implemented outside cli.py (each adds its own parser)."""

from __future__ import annotations

REGISTRY: list = []
