import pytest

import attnkit


def test_unknown_mechanism_lists_known_names():
    with pytest.raises(ValueError, match="known mechanisms") as info:
        attnkit.get("no-such-mechanism")
    assert "did you mean" not in str(info.value)
    # close matches first; still a KeyError for code written against the earlier behaviour
    with pytest.raises(ValueError, match=r"did you mean 'performer'") as info:
        attnkit.get("performr")
    assert isinstance(info.value, KeyError) and isinstance(info.value, attnkit.errors.UnknownMechanismError)
    assert str(info.value).startswith("no mechanism named 'performr'")  # not quoted as KeyError would
    with pytest.raises(KeyError):
        attnkit.mechanism_info("sliding-window")


def test_records_are_complete():
    for m in attnkit.list_mechanisms():
        assert m.name and m.family and m.paper and m.complexity
        assert isinstance(m.exact, bool) and isinstance(m.causal, bool)
