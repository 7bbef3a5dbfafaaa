"""goat_dist."""
