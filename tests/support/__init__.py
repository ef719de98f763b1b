"""Test support: real server and redis-server processes, SDK helpers (no mocks)."""
