"""smelt flows."""
