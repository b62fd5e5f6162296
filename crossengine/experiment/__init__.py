"""What to run: the experiment file's schema and loading, the plan, checks before anything loads, built-in fixtures."""
