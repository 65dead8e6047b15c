"""The HTTP edge: Twilio webhooks, agent and admin APIs, health and metrics."""
