"""Baseline webhook handlers the router is measured against, each run as its own process."""
