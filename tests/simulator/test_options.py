"""SimulatorOptions validation and the sim_ query knobs."""

from __future__ import annotations

import pytest

from relay.simulator import KNOBS, SimulatorOptions
from relay.simulator.options import KnobError


@pytest.mark.parametrize(
    "bad",
    [
        {"first_audio_ms": -1},
        {"chunk_ms": 15},
        {"max_session_s": 0},
        {"close_code": 1006},
        {"reject_status": 302},
        {"api_key": ""},
        {"drop_after_s": -1.0},
    ],
)
def test_bad_options_are_refused_at_construction(bad: dict[str, object]) -> None:
    """Out-of-range options raise a ValueError naming the field."""
    with pytest.raises(KnobError) as caught:
        SimulatorOptions(**bad)
    assert caught.value.param == next(iter(bad))


def test_knobs_override_typed_fields() -> None:
    """sim_ parameters are parsed by the field's type; 'none' unsets optional ones; others are ignored."""
    base = SimulatorOptions(close_after_s=5.0)
    options = base.with_knobs(
        {
            "model": "gpt-realtime",
            "sim_first_audio_ms": "300",
            "sim_realtime_pacing": "false",
            "sim_max_session_s": "2.5",
            "sim_close_after_s": "none",
            "sim_error_code": "boom",
        }
    )
    assert (options.first_audio_ms, options.realtime_pacing, options.max_session_s) == (300, False, 2.5)
    assert options.close_after_s is None and options.error_code == "boom"
    assert base.with_knobs({"model": "x"}) is base


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"sim_api_key": "k"}, "sim_api_key"),
        ({"sim_seed": "x"}, "sim_seed"),
        ({"sim_chunk_ms": "7"}, "sim_chunk_ms"),
    ],
)
def test_bad_knobs_name_the_parameter(query: dict[str, str], param: str) -> None:
    """Unknown knobs (including the server-only api_key) and bad values raise KnobError with the param."""
    with pytest.raises(KnobError) as caught:
        SimulatorOptions().with_knobs(query)
    assert caught.value.param == param


def test_knob_list_is_prefixed() -> None:
    """Every knob starts with sim_."""
    assert KNOBS and all(k.startswith("sim_") for k in KNOBS)
