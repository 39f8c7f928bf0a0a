"""Training-recipe callbacks, one trick per module."""
