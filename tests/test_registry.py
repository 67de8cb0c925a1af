import pytest

import attnkit


def test_unknown_mechanism_lists_known_names():
    with pytest.raises(KeyError, match="known mechanisms"):
        attnkit.get("no-such-mechanism")


def test_records_are_complete():
    for m in attnkit.list_mechanisms():
        assert m.name and m.family and m.paper and m.complexity
        assert isinstance(m.exact, bool) and isinstance(m.causal, bool)
