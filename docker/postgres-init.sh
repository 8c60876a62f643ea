#!/bin/bash
# Run once by the postgres image when its data volume is empty (/docker-entrypoint-initdb.d):
# creates the role and database of the MLflow tracking server next to Airflow's database.
# The role's password comes from MLFLOW_DB_PASSWORD (.env); nothing is stored in this file.
set -e
if [ -z "${MLFLOW_DB_PASSWORD:-}" ]; then
  echo "postgres-init: MLFLOW_DB_PASSWORD is empty; set it in .env" >&2
  exit 1
fi
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  --set=mlflow_pw="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
SQL
