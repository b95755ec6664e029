"""Meta-learning: the one functional inner loop and the algorithms (update rules)."""
