"""Bundled scenario files (package data)."""
