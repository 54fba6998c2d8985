"""A BrokerContext without actors, for building the HTTP app in unit tests."""

from __future__ import annotations

from actors.context import ApiKeys, BrokerContext
from actors.metrics import BrokerMetrics
from config.settings import Settings


def context(settings: Settings | None = None) -> BrokerContext:
    settings = settings or Settings()
    return BrokerContext(settings=settings, queue=None, registry=None, server=None,
                         keys=ApiKeys(settings.auth.api_keys), run_query=lambda sql: ([], []),
                         metrics=BrokerMetrics())
