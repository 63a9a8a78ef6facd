"""A free TCP port on the loopback for a test's process group (tests/trainer is on pytest's import path)."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
