"""smelt models."""
