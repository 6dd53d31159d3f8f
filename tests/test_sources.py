"""``data.sources``: the spec a run reads its training sources from, and its refusals (calcjax.data.sources).
The mixture itself is checked on shards in tests/test_train.py."""

from __future__ import annotations

import pytest

from calcjax.core.config import ConfigError
from calcjax.data import sources


def test_an_empty_spec_is_data_shards_alone():
    assert sources.parse_sources("", "S") == [sources.Source("main", "S", 1.0)]


def test_entries_give_name_folder_weight_and_split():
    got = sources.parse_sources("phantom:/a/shards:0.7, real:/b:0.3:all", "ignored")
    assert got == [sources.Source("phantom", "/a/shards", 0.7), sources.Source("real", "/b", 0.3, "all")]
    assert sources.shares(got) == pytest.approx([0.7, 0.3])
    assert sources.shares(sources.parse_sources("a:/x:3,b:/y:1", "")) == pytest.approx([0.75, 0.25])


@pytest.mark.parametrize(
    ("spec", "rule"),
    [
        ("phantom:/a", "NAME:FOLDER:WEIGHT"),
        ("phantom:/a:0.5:train:extra", "NAME:FOLDER:WEIGHT"),
        ("phantom::0.5", "NAME:FOLDER:WEIGHT"),
        ("Phantom:/a:1", "the name must match"),
        ("phantom:/a:0", "finite number > 0"),
        ("phantom:/a:-1", "finite number > 0"),
        ("phantom:/a:nan", "finite number > 0"),
        ("phantom:/a:half", "finite number > 0"),
        ("a:/x:1,a:/y:1", "a name of its own"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_rule(spec, rule):
    with pytest.raises(ConfigError, match=rule):
        sources.parse_sources(spec, "")


def test_no_shards_and_no_sources_is_refused():
    with pytest.raises(ConfigError, match="data.shards"):
        sources.parse_sources("  ", "")
