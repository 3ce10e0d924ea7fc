"""Wire protocols: each front parses its messages into calls on the voice core and renders the core's events."""
