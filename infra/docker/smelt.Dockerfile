# The smelt code and its locked environment, on smelt's local base image (Debian + Python 3.11 + uv;
# `bash infra/docker/base-image.sh smelt-base:latest`): the Prefect worker runs flows in it, and the
# stack's Prefect and MLflow servers run from it too (prefect, mlflow, asyncpg and psycopg2 are locked deps).
FROM smelt-base:latest
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY cli cli
COPY flows flows
COPY tasks tasks
COPY models models
COPY serving serving
COPY bench bench
COPY infra/configs infra/configs
COPY data data
# psycopg2 (a dev dependency of the project, for its PostgreSQL tests) is what the stack's MLflow server needs.
RUN uv sync --frozen --no-dev --no-cache && uv pip install --no-cache "prefect-kubernetes>=0.6" "psycopg2-binary==2.9.13"
ENV PATH="/app/.venv/bin:$PATH"
