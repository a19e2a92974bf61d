"""A work-around for Snakemake's job scheduler spinning on wide DAGs (applied by the Snakefile).

Snakemake 9 (checked up to 9.27.1) always has a job rate limiter (`--max-jobs-per-timespan`,
default 100/1s), and `JobScheduler.schedule` ends every selection round by starting a new
`threading.Timer` that wakes the scheduler again after the limiter's timespan. A round woken by a
finished job starts a timer too, so every finished job adds one more timer chain that never ends:
after k finished jobs the scheduler is woken k times a second, and each round checks the inputs of
every ready job. On the SRPBS-shaped run (1,909 jobs, ~1,100 ready at once) Snakemake's own process
took 3.4 CPU-s per finished job, 0.40 with this patch (benchmarks/scale.md, snakemake_scheduler.md).

`coalesce_reevaluation_timers` replaces that method with one that keeps at most one wake-up
pending per scheduler. The limiter still gets its re-evaluation after its timespan (the pending
timer), finished jobs still wake the scheduler at once (they release the semaphore themselves), and
the timer is a daemon thread, so the last one no longer holds the process open for a timespan at
exit. It touches nothing else, and nothing when the method is not there (another Snakemake).
"""

from __future__ import annotations

import threading

def coalesced_reevaluation(self, delay: float) -> None:
    """Wake the scheduler after `delay` seconds unless a wake-up is already pending."""
    lock = self.__dict__.setdefault("_harmodiff_wakeup_lock", threading.Lock())
    with lock:
        if self.__dict__.get("_harmodiff_wakeup_pending"):
            return
        self._harmodiff_wakeup_pending = True

    def wake():
        with lock:
            self._harmodiff_wakeup_pending = False
        self._open_jobs.release()

    timer = threading.Timer(delay, wake)
    timer.daemon = True
    timer.start()


def coalesce_reevaluation_timers(scheduler_class=None) -> bool:
    """Patch `scheduler_class` (default: Snakemake's JobScheduler); True if it is patched now."""
    if scheduler_class is None:
        try:
            from snakemake.scheduling.job_scheduler import JobScheduler as scheduler_class
        except ImportError:
            return False
    if not hasattr(scheduler_class, "_schedule_reevalutation"):  # sic, Snakemake's spelling
        return False
    scheduler_class._schedule_reevalutation = coalesced_reevaluation
    return True
