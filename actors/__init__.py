"""Thin Ray wrappers around the pure core."""
