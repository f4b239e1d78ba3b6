"""Fixtures for the lm-evaluation-harness evaluator: skipped, with the reason, where
the ``eval`` extra is not installed; a guard that fails a test on any network connection."""
import socket

import pytest


@pytest.fixture(scope="session")
def harness():
    """lm-eval (the ``eval`` extra), or a skip that says how to install it."""
    return pytest.importorskip("lm_eval", reason="the eval extra is not installed: pip install 'curvlens[eval]'")


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to connect a socket to a host other than this one is recorded
    and refused; the test asserts the list is empty."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"test guard: no network (connect to {address!r})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.fixture(scope="session")
def zoo_harness(harness, quick_zoo):
    """The harness evaluator over the quick zoo's four capabilities (shipped task files)."""
    from curvlens.evaluators import lm_eval, zoo_tasks

    return lm_eval(list(quick_zoo.capabilities.values()), include_path=zoo_tasks(quick_zoo), device="cpu")
