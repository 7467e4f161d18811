"""`tokenhive serve`: the OpenAI-compatible HTTP front door onto the pool."""
