"""``make stack``: the docker-compose.yaml topology as plain processes on one machine (no Docker).

Not a pipeline stage: a development and CI harness that runs Postgres, Redis, SeaweedFS, the MLflow
server and Airflow's CeleryExecutor components from packages, configured from docker-compose.yaml.
"""
