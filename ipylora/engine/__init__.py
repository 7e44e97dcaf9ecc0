"""The ipylora engine: plain Python, no IPython.

`Session` holds the resident base model, named datasets and adapters; the functions in the
sibling modules prepare data, train, generate and save. Magics and widgets sit on top of this
package; this package never imports them (a test checks it).
"""

import logging
import warnings

# Noise that users cannot act on: bitsandbytes tries to download a CPU kernel from the hub at
# import, and TRL calls transformers APIs that warn about their own deprecation.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)

from ipylora.engine.config import DataArgs, GenerateArgs, LoraArgs, TrainArgs
from ipylora.engine.errors import (
    ConfigError,
    DatasetError,
    IpyloraError,
    ModelLoadError,
    OutOfMemoryError,
    SessionBusyError,
    UnknownNameError,
)
from ipylora.engine.session import Session, get_session
from ipylora.engine.sweep import SweepArgs

__all__ = [
    "ConfigError",
    "DataArgs",
    "DatasetError",
    "GenerateArgs",
    "IpyloraError",
    "LoraArgs",
    "ModelLoadError",
    "OutOfMemoryError",
    "Session",
    "SessionBusyError",
    "SweepArgs",
    "TrainArgs",
    "UnknownNameError",
    "get_session",
]
