"""Multi-turn chat: conversation state, template deltas, eviction, and the terminal."""
