"""Plain functions of the ETL stage: input formats, record shapes, normalisation and quality checks.

No Prefect or MLflow here; `tasks/etl.py` wires them into the stage and its Prefect tasks.
"""
