"""Installer internals used by model_setup.py; never imports the server."""
