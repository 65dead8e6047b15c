"""Typed application keys: router resources live on the app, never in globals."""

from __future__ import annotations

from aiohttp import web

from omniroute.infra.bus import Bus
from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.settings import Settings
from omniroute.infra.store import Store
from router.ingress import Ingress

SETTINGS = web.AppKey("settings", Settings)
CONFIG = web.AppKey("config", LiveConfig)
BUS = web.AppKey("bus", Bus)
STORE = web.AppKey("store", Store)
INGRESS = web.AppKey("ingress", Ingress)
