"""research/data."""
