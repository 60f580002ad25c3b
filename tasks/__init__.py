"""smelt tasks."""
