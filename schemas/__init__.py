"""Contracts: events, Twilio webhook forms, configuration, API bodies. No I/O."""
