"""The status ticker: silent on short loops, a line per interval with rows/s and ETA on long ones."""

from safesteer.progress import ticker


def _run(steps, every=30.0, total=100):
    now = [0.0]
    lines: list[str] = []
    advance = ticker(total, "answers", every=every, write=lines.append, clock=lambda: now[0])
    for dt, n in steps:
        now[0] += dt
        advance(n)
    return lines


def test_a_short_loop_prints_nothing():
    assert _run([(1.0, 10)] * 10) == []  # 10 s in all, done before the first interval


def test_a_long_loop_prints_rows_rate_and_eta_once_per_interval():
    lines = _run([(10.0, 5)] * 20)  # 5 rows per 10 s = 0.5 rows/s; 100 rows take 200 s
    # at 30 s (15 rows), 60 s (30 rows), …; never at the end (the caller reports that)
    assert lines[0] == "answers: 15/100 rows, 0.5 rows/s, ETA 2m50s"
    assert lines[1] == "answers: 30/100 rows, 0.5 rows/s, ETA 2m20s"
    assert len(lines) == 6  # 30, 60, …, 180 s; the 200 s step finishes the loop


def test_the_rate_counts_rows_since_the_start():
    lines = _run(
        [(40.0, 10), (40.0, 30)], total=100
    )  # 10 rows in 40 s (0.25/s, 90 left: 360 s), then 40 in 80 s (0.5/s, 60 left: 120 s)
    assert lines == [
        "answers: 10/100 rows, 0.2 rows/s, ETA 6m00s",
        "answers: 40/100 rows, 0.5 rows/s, ETA 2m00s",
    ]
