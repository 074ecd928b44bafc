"""The suite runs with network and pickle loading blocked; these tests prove the guard is live."""

from __future__ import annotations

import pickle
import socket

import pytest
import torch

import conftest


def test_outbound_connections_are_refused_without_resolving_or_sending(offline_and_pickle_free):
    before = len(offline_and_pickle_free)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(ConnectionRefusedError, match="blocked"):
            s.connect(("example.invalid", 443))  # refused before any DNS look-up
    assert len(offline_and_pickle_free) == before + 1
    offline_and_pickle_free.pop()


def test_loopback_is_allowed():
    assert conftest._is_local_address(("127.0.0.1", 8188))
    assert conftest._is_local_address(("::1", 8188, 0, 0))
    assert not conftest._is_local_address(("192.0.2.1", 80))
    assert not conftest._is_local_address(("huggingface.invalid", 443))


def test_pickle_and_torch_load_are_refused(tmp_path, offline_and_pickle_free):
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(AssertionError, match="pickle"):
        torch.load(path)
    with pytest.raises(AssertionError, match="pickle"):
        with open(path, "rb") as handle:
            pickle.load(handle)
    del offline_and_pickle_free[-2:]


def test_main_paths_left_no_blocked_calls(offline_and_pickle_free):
    """So far in this session nothing was blocked; at the end any blocked call fails the whole run."""
    assert offline_and_pickle_free == []
