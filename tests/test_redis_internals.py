"""The redis-py internals ``worker.core.redis_connection`` relies on, checked against the installed redis-py.

On a Redis Cluster, ``_SeededNodes`` replaces the client's ``NodesManager`` (built again from the
old one's ``startup_nodes``, ``require_full_coverage``, ``connection_kwargs``, ``address_remap`` and
``_event_dispatcher``) and refills ``startup_nodes`` in ``initialize``; ``acquire_connection`` takes
a connection of a key's master with ``ClusterNode.acquire_connection`` and gives it back as
``ClusterNode.execute_command`` does, on ``_free``. pyproject pins redis-py below its next minor
release; when a new release is allowed, these tests say whether that still holds: a failure here
means reading redis-py's new ``asyncio/cluster.py`` before moving the bound.
"""

from __future__ import annotations

import collections
import importlib.metadata
import inspect

from redis.asyncio.cluster import ClusterNode, NodesManager, RedisCluster

from worker.core.redis_connection import _SeededNodes, connect_redis_or_cluster

#: The redis-py releases whose internals were read against ``worker.core.redis_connection``.
CHECKED_RELEASES = ("5.3",)


def test_the_installed_redis_py_is_a_checked_release() -> None:
    version = importlib.metadata.version("redis")
    assert version.rsplit(".", 1)[0] in CHECKED_RELEASES, f"redis-py {version}: check its internals, then add it"


def test_the_nodes_manager_is_rebuilt_from_what_it_was_built_with() -> None:
    parameters = list(inspect.signature(NodesManager.__init__).parameters)
    assert parameters == [
        "self", "startup_nodes", "require_full_coverage", "connection_kwargs", "address_remap", "event_dispatcher"
    ]  # fmt: skip
    assert inspect.iscoroutinefunction(NodesManager.initialize)
    assert "self.startup_nodes" in inspect.getsource(NodesManager.initialize)


async def test_a_cluster_client_gets_seeded_nodes_sharing_its_event_dispatcher() -> None:
    # Built without I/O: the slot map is asked for at the first command.
    cluster = connect_redis_or_cluster("redis+cluster://127.0.0.1:1,127.0.0.1:2/")
    assert isinstance(cluster, RedisCluster)
    nodes = cluster.nodes_manager
    assert isinstance(nodes, _SeededNodes)
    assert nodes.seeds == (("127.0.0.1", 1), ("127.0.0.1", 2))
    assert sorted(nodes.startup_nodes) == ["127.0.0.1:1", "127.0.0.1:2"]
    assert nodes._event_dispatcher is cluster._event_dispatcher
    await cluster.aclose()


def test_a_node_lends_its_connections_from_free() -> None:
    node = ClusterNode("127.0.0.1", 1)
    assert isinstance(node._free, collections.deque)
    assert "self._free.popleft()" in inspect.getsource(ClusterNode.acquire_connection)
    assert "self._free.append(connection)" in inspect.getsource(ClusterNode.execute_command)
