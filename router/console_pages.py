"""The console's pages and static files (/console, /console/supervisor). (Being built.)"""

from __future__ import annotations

from router.routes import Route

ROUTES: list[Route] = []
