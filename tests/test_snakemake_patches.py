import threading
import time

from snakemake.scheduling.job_scheduler import JobScheduler

from harmodiff.snakemake_patches import coalesce_reevaluation_timers, coalesced_reevaluation


def _releases(semaphore):
    n = 0
    while semaphore.acquire(blocking=False):
        n += 1
    return n


class FakeScheduler:
    def __init__(self):
        self._open_jobs = threading.Semaphore(0)

    def _schedule_reevalutation(self, delay):  # Snakemake's: one timer per call, non-daemon
        threading.Timer(delay, lambda: self._open_jobs.release()).start()


def test_snakemake_starts_one_timer_per_round_and_the_patch_keeps_one_pending():
    unpatched = FakeScheduler()
    for _ in range(40):
        unpatched._schedule_reevalutation(0.05)
    time.sleep(0.4)
    assert _releases(unpatched._open_jobs) == 40  # 40 rounds, 40 more wake-ups: the chains multiply

    assert coalesce_reevaluation_timers(FakeScheduler)
    patched = FakeScheduler()
    for _ in range(40):
        patched._schedule_reevalutation(0.05)
    time.sleep(0.4)
    assert _releases(patched._open_jobs) == 1
    patched._schedule_reevalutation(0.05)  # once it has fired, the next round gets its wake-up again
    time.sleep(0.4)
    assert _releases(patched._open_jobs) == 1


def test_wake_up_timer_does_not_hold_the_process_open():
    s = FakeScheduler()
    coalesced_reevaluation(s, 3600)
    timers = [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()]
    assert timers and all(t.daemon for t in timers)
    assert _releases(s._open_jobs) == 0


def test_snakemakes_own_scheduler_is_patched_and_patching_twice_is_a_no_op():
    assert coalesce_reevaluation_timers()
    assert JobScheduler._schedule_reevalutation is coalesced_reevaluation
    assert coalesce_reevaluation_timers()
    assert JobScheduler._schedule_reevalutation is coalesced_reevaluation
    assert not coalesce_reevaluation_timers(object)  # another Snakemake without the method: untouched
