"""Redis connections."""

from __future__ import annotations

from redis._parsers.hiredis import _HiredisParser
from redis.connection import HiredisRespSerializer

from banter.redisconn import connect


def test_connections_parse_and_pack_in_c(redis_server):
    """Every token is a command packed and a reply parsed on the engine's publisher thread and
    a message parsed in the producer: hiredis does both in C (a step of 16 tokens cost the
    publisher about 0.57 ms of CPU with it against 0.95 ms without, docs/benchmarks.md)."""
    client = connect(redis_server.url)
    connection = client.connection_pool.get_connection()
    try:
        assert isinstance(connection._parser, _HiredisParser)
        assert isinstance(connection._command_packer, HiredisRespSerializer)
        assert client.echo("é" * 3) == "ééé"
    finally:
        client.connection_pool.release(connection)
