"""Test-only references (not used by the engine): the static on-device decoder."""
