"""Renderers: turn library results and engine events into terminal output."""
