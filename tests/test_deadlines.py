"""Request timeouts filed in slots, swept by one timer (pure)."""

from kom_gateway.proxy.deadlines import Deadlines


def test_expired_never_early_at_most_one_tick_late_in_order():
    d: Deadlines[str] = Deadlines(tick=0.25)
    d.add("a", 10.0)
    d.add("b", 10.3)
    d.add("c", 12.0)
    assert d.expired(9.99) == []
    assert d.expired(10.0) == []  # due at 10.0: the slot ends at 10.25
    assert d.expired(10.25) == ["a"]
    assert d.expired(10.5) == ["b"]
    assert len(d) == 1
    assert d.expired(100.0) == ["c"] and len(d) == 0


def test_removed_items_never_fire_and_re_adding_moves_them():
    d: Deadlines[str] = Deadlines(tick=1.0)
    d.add("a", 5.0)
    d.add("b", 5.0)
    d.remove("a")
    d.remove("zzz")  # unknown: fine
    d.add("b", 50.0)
    assert d.expired(10.0) == [] and len(d) == 1
    assert d.expired(51.0) == ["b"]


def test_a_deadline_in_the_past_fires_at_the_next_sweep():
    d: Deadlines[str] = Deadlines(tick=1.0)
    assert d.expired(20.0) == []
    d.add("late", 3.0)
    assert d.expired(20.5) == []  # same slot as the last sweep: not swept twice
    assert d.expired(21.0) == ["late"]
