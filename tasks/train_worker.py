"""One process of a multi-process training run, started by torchrun or accelerate launch:
`python -m tasks.train_worker JOB.json`. Runs the same `run_job` the single-process path runs;
the main process logs its per-step points to the job's MLflow run."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from models.finetune import TrainJob, run_job


def main(job_file: str) -> None:
    job = TrainJob.model_validate_json(Path(job_file).read_text())
    logger = None
    if job.tracking_uri and job.run_id:
        from tasks.tracking import step_logger

        logger = step_logger(job.tracking_uri, job.run_id)
    run_job(job, logger=logger)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1])
