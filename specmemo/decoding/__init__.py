"""Drafters, verification, and the generation loop that yields events."""
