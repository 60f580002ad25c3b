"""The Prefect cache policy every cached stage uses.

Prefect's TASK_SOURCE hashes only the @task function's own lines, not the code it calls, so a
change in models/, tasks/ or serving/ would let a rerun return results computed by the old code. Adding
a hash of both packages' sources makes a code change invalidate the cache, as inputs do.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

PACKAGES = ("models", "tasks", "serving")  # serving/ too: the package stage builds it into the Bento


@functools.cache
def code_digest(packages: tuple[str, ...] = PACKAGES, root: Path = Path(__file__).resolve().parent.parent) -> str:
    h = hashlib.sha256()
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class PackageSource(CachePolicy):
    """Cache key part: the source of every module a stage may call."""

    def compute_key(self, task_ctx: Any, inputs: Optional[dict[str, Any]], flow_parameters: Optional[dict[str, Any]],
                    **kwargs: Any) -> Optional[str]:
        return code_digest()


STAGE_CACHE = INPUTS + TASK_SOURCE + PackageSource()
