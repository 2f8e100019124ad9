import pytest
import torch

from ttaserve.server.state import StateMismatchError, StreamState, decode_state, encode_state


def _state(**kw):
    g = torch.Generator().manual_seed(0)
    tensors = {"bn.0.mean": torch.randn(16, generator=g), "bn.0.var": torch.rand(16, generator=g)}
    return StreamState(policy="bn", policy_params={"alpha": 1.0}, model_fingerprint="abc", tensors=tensors, **kw)  # fmt: skip


def test_round_trip_is_bit_exact():
    state = _state(version=3, samples_seen=10, updates=2, resets=1)
    decoded = decode_state(encode_state(state), "abc")
    assert decoded.header() == state.header()
    for key, tensor in state.tensors.items():
        assert torch.equal(decoded.tensors[key], tensor)


def test_other_model_or_schema_or_garbage_is_a_mismatch_not_a_crash():
    blob = encode_state(_state())
    with pytest.raises(StateMismatchError):
        decode_state(blob, "another-model")
    with pytest.raises(StateMismatchError):
        decode_state(blob.replace(b'\\"schema\\": 1', b'\\"schema\\": 9'), "abc")
    for garbage in [b"", b"\x00" * 4, b"\xff" * 64, blob[:40]]:
        with pytest.raises(StateMismatchError):
            decode_state(garbage, "abc")


def test_non_finite_state_is_rejected():
    state = _state()
    state.tensors["bn.0.mean"][0] = float("nan")
    with pytest.raises(StateMismatchError):
        decode_state(encode_state(state), "abc")
