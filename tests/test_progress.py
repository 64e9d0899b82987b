"""Long phases report to progress bars and to the log: a start line and one line per quarter."""

import logging

from fedmmkt_core.server.progress import progress_events


def test_progress_sends_phase_events_and_logs_each_quarter(caplog):
    events = []
    progress = progress_events(lambda event, **data: events.append((event, data)))
    with caplog.at_level(logging.INFO, logger="fedmmkt"):
        for step in (1, 20, 25, 26, 50, 99, 100, 100):
            progress("pretrain generator: UNet", step, 100)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "pretrain generator: UNet: started (100 steps)"
    assert [line.split(" after ")[0] for line in lines[1:]] == [
        "pretrain generator: UNet: 25/100",
        "pretrain generator: UNet: 50/100",
        "pretrain generator: UNet: 99/100",  # the first report at or past three quarters
        "pretrain generator: UNet: 100/100",
    ]
    assert events[0] == ("phase_start", {"name": "pretrain generator: UNet", "total": 100})
    advances = [data["advance"] for event, data in events if event == "phase_advance"]
    assert advances == [1, 19, 5, 1, 24, 49, 1]  # the repeated 100 advances nothing


def test_a_phase_without_a_total_logs_only_its_start(caplog):
    progress = progress_events(lambda event, **data: None)
    with caplog.at_level(logging.INFO, logger="fedmmkt"):
        progress("scoring", 3, 0)
    assert [r.getMessage() for r in caplog.records] == ["scoring: started (0 steps)"]
