"""smelt serving."""
