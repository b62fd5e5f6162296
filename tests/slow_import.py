"""A module whose import takes long, as a training stack's can: the interrupt test stops a run while
the checks before it import this (as they import any user code the experiment names)."""

import os
import time
from pathlib import Path

_started = os.environ.get("CROSSENGINE_TEST_SLOW_IMPORT")
if _started:
    Path(_started).touch()
    time.sleep(60)


def factory(*args, **kwargs):  # never reached in the test: the run is stopped while this module imports
    raise RuntimeError("not a model")
