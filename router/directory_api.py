"""What an agent may see of the contact centre to transfer work: queues and agents.
(Being built.)"""

from __future__ import annotations

from router.routes import Route

ROUTES: list[Route] = []
