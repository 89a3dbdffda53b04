"""What the identity-graph integration tests share: a request built from identifiers, a loaded graph."""

from __future__ import annotations

import redis.asyncio as aioredis

from services.identity.domain import GraphLayout, GraphRules, ResolutionRequest, new_customer_id
from services.identity.graph import IdentityGraph
from touchstream.identifiers import Identifier


def request(message_id: str, event_time_ms: int, *identifiers: Identifier) -> ResolutionRequest:
    """An event at `event_time_ms` carrying `identifiers`, with the id a new customer would get."""
    return ResolutionRequest(message_id, event_time_ms, identifiers, new_customer_id(identifiers))


async def loaded_graph(client: aioredis.Redis, layout: GraphLayout, rules: GraphRules) -> IdentityGraph:
    """A graph over `client` with its Lua scripts loaded, answers cached for an hour."""
    identity_graph = IdentityGraph(client, layout, rules, event_ttl_s=3600)
    await identity_graph.load_script()
    return identity_graph
