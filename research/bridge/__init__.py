"""research/bridge."""
