"""Uplift models: the neural multi-arm model and the tree-based T-learner baseline."""
