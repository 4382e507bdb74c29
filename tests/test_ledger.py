import pytest

from kvside.engine.ledger import LIVE, SUMMARY, Ledger
from kvside.engine.sampling import StopMatcher


def test_append_remove_shift_keep_order():
    led = Ledger()
    assert led.append([1, 2, 3], msg=0) == 0
    assert led.append([4, 5], msg=1) == 3
    assert led.pos == [0, 1, 2, 3, 4] and led.next_pos == 5
    assert led.remove(1, 3, "masked") == 2
    assert led.pos == [0, 3, 4] and led.tok == [1, 4, 5]
    assert led.removed[0].messages == [0] and led.removed[0].n_tokens == 2
    led.shift(3, -1, -2)
    assert led.pos == [0, 1, 2] and led.next_pos == 3
    led.mark(1, 2, SUMMARY)
    assert led.state == [LIVE, SUMMARY, LIVE]


def test_runs_group_messages_and_gaps():
    led = Ledger()
    led.append([1, 2], msg=0)
    led.append([3, 4], msg=1)
    led.remove(2, 3, "masked")
    runs = led.runs()
    assert [(r["msg"], r["p0"], r["p1"]) for r in runs] == [(0, 0, 2), (1, 3, 4)]


def test_round_trip_and_validation():
    led = Ledger()
    led.append([7, 8, 9], msg=2)
    led.remove(0, 1, "rolled")
    again = Ledger.from_dict(led.to_dict())
    assert again.to_dict() == led.to_dict()
    bad = led.to_dict()
    bad["pos"] = [5, 4]
    with pytest.raises(ValueError):
        Ledger.from_dict(bad)


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["</end>"])
    assert m.feed("hello </e") == ("hello ", False)
    assert m.feed("nd> tail") == ("", True)
    m = StopMatcher(["</end>"])
    assert m.feed("a </x") == ("a </x", False)
    m = StopMatcher(["ab"])
    assert m.feed("xa") == ("x", False)
    assert m.flush() == "a"
