"""`kvside serve`: an OpenAI-compatible HTTP daemon over the engine."""
