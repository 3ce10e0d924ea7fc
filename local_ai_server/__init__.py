"""local_ai_server: a self-hosted voice AI server speaking the AVA local_ai_server protocol v2."""
