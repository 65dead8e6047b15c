"""The supervisor's live view of the queues (GET /api/admin/queues). (Being built.)"""

from __future__ import annotations

from router.routes import Route

ROUTES: list[Route] = []
