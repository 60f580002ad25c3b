# The smelt code and its locked environment, for the Prefect worker (flows run in this image).
FROM python:3.11-slim
RUN pip install --no-cache-dir uv
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
RUN uv sync --frozen --no-dev && uv pip install "prefect-kubernetes>=0.6"
ENV PATH="/app/.venv/bin:$PATH"
