#!/usr/bin/env bash
# One-shot set-up of the stack, run by the airflow-init service of docker-compose.yaml (as root).
# Every other Airflow service and MLflow wait until it has exited 0. It is idempotent: run it
# again with `docker compose up airflow-init` after changing .env.
#   1. refuses empty, placeholder or weak credentials from .env;
#   2. prepares the logs and data-root volumes for AIRFLOW_UID (the user the services run as);
#   3. migrates the metadata database and creates the admin user (the image's /entrypoint does
#      both, from _AIRFLOW_DB_MIGRATE and _AIRFLOW_WWW_USER_*, as in Airflow's own compose file);
#   4. creates the pool `gpu` (GPU_POOL_SLOTS slots) used by the DAG's train and finetune tasks;
#   5. creates the S3 connection ($COVID_S3_CONN_ID, default aws_default) and mlflow_default;
#   6. creates the buckets of S3_BUCKETS in the S3 store (covid-xray, mlflow, airflow-logs).
set -euo pipefail

SETUP=/opt/covid/bin/airflow_setup.py
say() { echo "airflow-init: $*"; }

python "$SETUP" check

if [[ -z "${AIRFLOW_UID:-}" ]]; then
  say "AIRFLOW_UID is not set; using 50000. On Linux set AIRFLOW_UID=\$(id -u) in .env."
  export AIRFLOW_UID=50000
fi

# The data root is shared by every worker: it must be writable by AIRFLOW_UID (group 0 as in the
# official image). Only the top folders are changed, so a large data root is not walked.
mkdir -p /opt/airflow/logs "${COVID_DATA_ROOT:?}"
chown "${AIRFLOW_UID}:0" /opt/airflow/logs
chmod 2775 /opt/airflow/logs
# On NFS with root_squash root may not chown; what matters is that AIRFLOW_UID can write.
chown "${AIRFLOW_UID}:0" "${COVID_DATA_ROOT}" 2>/dev/null && chmod 2775 "${COVID_DATA_ROOT}" \
  || say "could not chown ${COVID_DATA_ROOT} (NFS root_squash?); checking that uid ${AIRFLOW_UID} can write it"
python "$SETUP" writable "${COVID_DATA_ROOT}" "${AIRFLOW_UID}"

say "migrating the metadata database and creating the admin user"
/entrypoint airflow version

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python "$SETUP" write "$work"
airflow pools import "$work/pools.json"
airflow connections import --overwrite "$work/connections.json"
python "$SETUP" buckets

# Files the steps above wrote as root under the logs volume must stay writable by the services.
find /opt/airflow/logs -user 0 -exec chown "${AIRFLOW_UID}:0" {} +
say "done: pool gpu (${GPU_POOL_SLOTS:-1} slots), connections ${COVID_S3_CONN_ID:-aws_default} and mlflow_default, buckets ${S3_BUCKETS}"
