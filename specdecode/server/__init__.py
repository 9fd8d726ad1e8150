"""OpenAI-compatible HTTP layer over the engine (specdecode serve)."""
