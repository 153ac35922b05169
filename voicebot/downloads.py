"""First-run downloads with a progress bar on the terminal (stderr), written atomically."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from urllib.request import urlopen

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16
TIMEOUT_S = 30.0
"""Per socket operation: a stalled server fails the download instead of hanging start-up."""


def download(url: str, target: Path, label: str) -> Path:
    """Fetch ``url`` into ``target`` with a progress bar named ``label``.

    The bytes go to a temporary file in the same directory, renamed into place when complete,
    so an interrupted download never leaves a truncated file that looks like a good one.
    """
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urlopen(url, timeout=TIMEOUT_S) as response,
            tqdm(
                total=int(response.headers.get("Content-Length") or 0) or None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                leave=True,
            ) as bar,
        ):
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    logger.debug("downloaded %s to %s", url, target)
    return target
