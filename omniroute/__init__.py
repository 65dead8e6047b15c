"""omniroute: the application shell and the plumbing every side shares."""
