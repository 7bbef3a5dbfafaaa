"""Distribution of GOAT layers: expert-parallel groups and dispatch, expert gradient handling,
and the distributed SVD initialiser. Model code receives these pieces as explicit arguments."""
