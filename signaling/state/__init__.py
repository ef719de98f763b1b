"""Shared domain state (calls, moderation, receipts...) kept in the broker's
engine, so every instance sees the same state."""

from signaling.state.base import StateStore

__all__ = ["StateStore"]
