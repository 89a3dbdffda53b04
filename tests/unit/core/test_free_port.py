"""Servers' ports come from below the kernel's ephemeral range, so a restarted server finds its port free."""

from __future__ import annotations

import socket

from touchstream.embedded import ephemeral_port_range, free_port


def test_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    ephemeral_low, _ = ephemeral_port_range()
    ports = [free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < ephemeral_low for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))


def test_an_outgoing_connection_never_takes_a_servers_port() -> None:
    # The kernel gives an outgoing connection's local end a port from the ephemeral range only.
    ephemeral_low, ephemeral_high = ephemeral_port_range()
    with socket.socket() as server:
        server.bind(("127.0.0.1", free_port()))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            assert ephemeral_low <= client.getsockname()[1] <= ephemeral_high
