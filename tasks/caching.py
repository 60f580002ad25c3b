"""The Prefect cache policy every cached stage uses.

Prefect's TASK_SOURCE hashes only the @task function's own lines, not the code it calls, so a
change in models/, tasks/ or serving/ would let a rerun return results computed by the old code. Adding
a hash of both packages' sources makes a code change invalidate the cache, as inputs do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from models.artifacts import code_digest

PACKAGES = ("models", "tasks", "serving")  # serving/ too: the package stage builds it into the Bento


@dataclass
class PackageSource(CachePolicy):
    """Cache key part: the source of every module a stage may call."""

    def compute_key(self, task_ctx: Any, inputs: Optional[dict[str, Any]], flow_parameters: Optional[dict[str, Any]],
                    **kwargs: Any) -> Optional[str]:
        return code_digest(PACKAGES)


STAGE_CACHE = INPUTS + TASK_SOURCE + PackageSource()
