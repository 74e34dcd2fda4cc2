"""Stopping at a signal: agreed by every rank without anyone waiting (1, 2 and 3 ranks).

    mpiexec -n 3 .venv/bin/python -m pytest tests/mpi/test_interrupt.py
"""

import time

import pytest

from mpiblmm import interrupt


@pytest.fixture
def handlers():
    interrupt.install(grace_seconds=30)
    yield
    interrupt.uninstall()


def test_no_signal_no_stop(mpi, handlers):
    agreement = interrupt.StopAgreement(mpi.comm)
    for _ in range(3):
        mpi.check(not agreement.should_stop(), "stopped without a signal")
    mpi.check(agreement.settle() is False, "settle says stop")


@pytest.mark.parametrize("signalled", [0, -1])
def test_one_signalled_rank_stops_every_rank_at_its_next_chunk_end(mpi, handlers, signalled):
    """Only one rank gets the signal; the others learn it at their next chunk end, however
    many chunks they have left, and settle agrees everywhere and drains every message."""
    who = signalled % mpi.size
    agreement = interrupt.StopAgreement(mpi.comm)
    if mpi.rank == who:
        interrupt._on_signal(15, None)  # as if SIGTERM arrived here
    mpi.comm.Barrier()                   # the signal has arrived before the next chunk end
    stopped_after = None
    deadline = time.monotonic() + 20
    chunk = 0
    while stopped_after is None and time.monotonic() < deadline:
        if agreement.should_stop():
            stopped_after = chunk
        chunk += 1
        time.sleep(0.01)
    mpi.check(stopped_after is not None, "never heard of the stop")
    mpi.check(mpi.rank == who and stopped_after == 0 or mpi.rank != who,
              f"the signalled rank went on for {stopped_after} chunks")
    mpi.check(agreement.settle() is True, "settle disagrees")
    mpi.check(interrupt.signal_name() == ("SIGTERM" if mpi.rank == who else ""), "signal name")
    # Nothing is left in flight: a fresh agreement sees no stop.
    interrupt.uninstall()
    interrupt.install()
    again = interrupt.StopAgreement(mpi.comm)
    mpi.check(not again.should_stop() and again.settle() is False, "a message was left over")


def test_grace_period_abandons_only_computations(mpi):
    interrupt.install(grace_seconds=0.05)
    try:
        interrupt._on_signal(15, None)
        abandoned = False
        try:
            with interrupt.abandonable():
                time.sleep(2)  # the timer fires within the grace period
        except interrupt.ChunkAbandoned:
            abandoned = True
        mpi.check(abandoned, "the computation was not abandoned")
        time.sleep(0.1)  # outside abandonable: the expired grace raises nothing
        with pytest.raises(interrupt.ChunkAbandoned):
            with interrupt.abandonable():
                pass      # once expired, no new computation starts
    finally:
        interrupt.uninstall()
