"""Suite-wide settings: no progress bars, and one converted-model cache for the whole run.

Converting the shipped GGUF model (dequantizing 135M parameters) takes tens of seconds; every
test process shares one cache under the system temp dir so it happens once per machine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("LMLOOP_NO_PROGRESS", "1")
os.environ.setdefault("LMLOOP_CACHE", str(Path(tempfile.gettempdir()) / "lmloop-test-cache"))
