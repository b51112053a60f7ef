"""The fake-address table: one stable address per name, mapped back, never reused."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.isolate.names import FAKE_RANGE, FakeNames, NamesExhaustedError, normalise


@pytest.mark.parametrize(
    ("name", "key"),
    [("API.Example.COM.", "api.example.com"), ("a.test", "a.test"), ("x.", "x")],
)
def test_normalise(name: str, key: str) -> None:
    assert normalise(name) == key


def test_first_names_get_consecutive_addresses_and_map_back() -> None:
    names = FakeNames()
    a = names.address_for("web.test")
    b = names.address_for("db.test")
    assert (str(a), str(b)) == ("198.18.0.1", "198.18.0.2")
    assert names.address_for("WEB.test.") == a  # same name, same address
    assert names.name_of("198.18.0.1") == "web.test"
    assert names.name_of("198.18.0.2") == "db.test"
    assert len(names) == 2


@pytest.mark.parametrize(
    ("address", "fake", "name"),
    [
        ("198.18.0.9", True, None),  # in the range, never handed out
        ("198.19.255.254", True, None),  # the range's last usable address
        ("198.20.0.1", False, None),  # just past the /15
        ("127.0.0.1", False, None),
        ("::1", False, None),
        ("not an address", False, None),
    ],
)
def test_addresses_outside_the_table(address: str, fake: bool, name: str | None) -> None:
    names = FakeNames()
    names.address_for("web.test")
    assert names.is_fake(address) is fake
    assert names.name_of(address) is name


def test_a_full_range_is_refused_in_words() -> None:
    names = FakeNames(ipaddress.IPv4Network("198.18.0.0/30"))  # two usable addresses
    names.address_for("a.test")
    names.address_for("b.test")
    full = r"all 2 fake addresses of 198\.18\.0\.0/30.*'c\.test'"
    with pytest.raises(NamesExhaustedError, match=full):
        names.address_for("c.test")
    assert names.address_for("a.test") == ipaddress.IPv4Address("198.18.0.1")  # old ones stay


labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)


@given(st.lists(st.lists(labels, min_size=1, max_size=4).map(".".join), max_size=60))
def test_every_name_round_trips_and_no_address_is_shared(asked: list[str]) -> None:
    names = FakeNames()
    given_out = {name: names.address_for(name) for name in asked}
    assert len(set(given_out.values())) == len(set(given_out))
    for name, address in given_out.items():
        assert address in FAKE_RANGE
        assert address not in (FAKE_RANGE.network_address, FAKE_RANGE.broadcast_address)
        assert names.name_of(str(address)) == normalise(name)
        assert names.address_for(name) == address
