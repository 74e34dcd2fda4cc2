"""``--grace-seconds`` (and ``--progress-interval``) are bounded at one week.

A fault audit gave ``--grace-seconds 1e300`` and sent SIGTERM during the fit: the signal
handler armed ``signal.setitimer`` with it, which raised ``OverflowError: timestamp out of
range for platform time_t`` (from about 9.3e9 s), a traceback and exit code 1 instead of a
clean stop.  The command line refuses such values (tests/cli/test_cli_basics.py); here the
parser's bound and the handler's own.
"""

from __future__ import annotations

import os
import signal

import pytest

from mpiblmm import interrupt
from mpiblmm.cli import MAX_SECONDS, CommandLineError, get_parser


def test_the_bound_is_one_week():
    assert MAX_SECONDS == interrupt.MAX_GRACE_SECONDS == 604800


@pytest.mark.parametrize("option", ["--grace-seconds", "--progress-interval"])
def test_durations_up_to_one_week_are_taken_and_longer_refused(option):
    dest = option.lstrip("-").replace("-", "_")
    args = get_parser().parse_args(["fit", "spec.json", option, "604800"])
    assert getattr(args, dest) == 604800.0
    for value in ("604800.5", "1e10", "1e300", "inf"):
        with pytest.raises(CommandLineError) as info:
            get_parser().parse_args(["fit", "spec.json", option, value])
        assert f"argument {option}: expected " in str(info.value)


def test_a_signal_with_a_huge_grace_arms_the_timer_at_the_bound():
    """Callers other than the command line (the pipeline's options) are bounded too: the
    handler runs at the signal, where an exception is a traceback."""
    interrupt.install(1e300)
    try:
        assert interrupt._state.grace == interrupt.MAX_GRACE_SECONDS
        os.kill(os.getpid(), signal.SIGTERM)           # handled at once, in this thread
        assert interrupt.requested() and interrupt.signal_name() == "SIGTERM"
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert interrupt.MAX_GRACE_SECONDS - 60 < remaining <= interrupt.MAX_GRACE_SECONDS
    finally:
        interrupt.uninstall()
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
