"""Tests for the model installer (registry, fetch, selection, model_setup.py)."""
