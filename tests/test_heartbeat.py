"""A wait with nothing to count still says it is alive, and stops saying so when it ends."""

import logging
import time

from lmloop.log import heartbeat


def test_heartbeat_beats_while_the_block_runs_and_stops_after(caplog):
    caplog.set_level(logging.INFO, logger="lmloop")
    with heartbeat("converting x.gguf", every=0.05):
        time.sleep(0.4)
    beats = [r.getMessage() for r in caplog.records if "converting x.gguf" in r.getMessage()]
    assert 3 <= len(beats) <= 9, beats
    assert beats[0].startswith("... converting x.gguf (")
    time.sleep(0.15)
    after = [r for r in caplog.records if "converting x.gguf" in r.getMessage()]
    assert len(after) == len(beats)  # nothing after the block ended
