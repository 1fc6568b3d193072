"""The embedded demo: an offline pool and the workflow on it, as two sweep files."""
