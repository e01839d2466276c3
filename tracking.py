"""Logging and experiment tracking for the trainer and the scripts."""
from __future__ import annotations

import logging


def quiet_library_logging() -> None:
    """Keep ppdiffusers' and PaddleNLP's per-file INFO lines (model loading, saving) out of the
    console; warnings and errors still show."""
    from paddlenlp.utils.log import logger as paddlenlp_logger
    from ppdiffusers.utils import logging as ppdiffusers_logging

    ppdiffusers_logging.set_verbosity_warning()
    paddlenlp_logger.set_level("WARNING")
    logging.getLogger("PaddleNLP").setLevel(logging.WARNING)
