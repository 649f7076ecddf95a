"""Spec changes that arrive together are held and roll the pods once."""

from __future__ import annotations

from zimage_operator.coalesce import ChangeCoalescer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_new_service_and_an_unchanged_one_are_never_held() -> None:
    clock = Clock()
    changes = ChangeCoalescer(quiet=2, max_hold=10, clock=clock)
    assert changes.hold("ns/a", 1) is None
    clock.now += 30
    assert changes.hold("ns/a", 1) is None
    assert not changes.due("ns/a")


def test_fifty_patches_in_ten_seconds_roll_at_most_twice() -> None:
    clock = Clock()
    changes = ChangeCoalescer(quiet=2, max_hold=10, clock=clock)
    changes.hold("ns/a", 1)
    rollouts = 0
    for generation in range(2, 52):  # one patch every 0.2 s, each seen by a pass
        clock.now += 0.2
        if changes.hold("ns/a", generation) is None:
            rollouts += 1
    for _ in range(10):  # the daemon's passes afterwards, every 2 s
        clock.now += 2
        if changes.due("ns/a") and changes.hold("ns/a", 51) is None:
            rollouts += 1
    assert 1 <= rollouts <= 2
    assert changes.hold("ns/a", 51) is None, "nothing is held once the last change rolled"


def test_one_change_waits_for_the_quiet_time_only() -> None:
    clock = Clock()
    changes = ChangeCoalescer(quiet=2, max_hold=10, clock=clock)
    changes.hold("ns/a", 1)
    clock.now += 60
    wait = changes.hold("ns/a", 2)
    assert wait == 2
    clock.now += 1.9
    assert not changes.due("ns/a")
    clock.now += 0.2
    assert changes.due("ns/a")
    assert changes.hold("ns/a", 2) is None


def test_a_reconciler_keeps_nothing_for_a_service_that_is_gone() -> None:
    from zimage_operator.config import OperatorSettings
    from zimage_operator.reconcile import Reconciler

    class Gone:
        """The one call a reconcile of a deleted service makes: the service is not there."""

        def get_service(self, namespace: str, name: str) -> None:
            return None

    reconciler = Reconciler(Gone(), OperatorSettings(_env_file=None), lambda *args: None)  # type: ignore[arg-type]
    reconciler._failures["ml/posters"] = "an old problem"
    reconciler._changes.hold("ml/posters", 2)
    reconciler.reconcile("ml", "posters")
    assert reconciler._failures == {}
    assert reconciler._locks == {}
    assert not reconciler.rollout_due("ml", "posters")
