"""research/evaluation."""
