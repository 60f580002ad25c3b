# MLflow server with the PostgreSQL driver and S3 (MinIO) client it needs in infra/docker-compose.yml.
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg2-binary>=2.9" "boto3>=1.34"
EXPOSE 5000
