#!/usr/bin/env bash
# One-shot start-up job of docker/docker-compose.yml (service airflow-init); every step is idempotent, so
# each `docker compose up` re-runs it and that is how upgrades migrate.
#
# As root it only hands the shared volumes to the airflow user (a fresh named volume is already owned by
# it, a bind mount is owned by whoever created it), then re-runs itself as that user to refuse placeholder
# secrets, migrate Airflow's metadata DB (FAB's tables included), migrate the warehouse with Alembic and
# create the MLflow experiment (`couponops init`), and create the admin user.
set -euo pipefail

landing="${COUPONOPS_LANDING_URL#file://}"

if [[ "$(id -u)" == "0" ]]; then
  mkdir -p "${AIRFLOW_HOME}/logs" "${COUPONOPS_STATE_DIR}" "${landing}/batches" "${landing}/feedback"
  # Logs and state are Airflow's alone. The landing zone also holds the shop's files: take its folders,
  # not the batches inside them.
  chown -R airflow:0 "${AIRFLOW_HOME}/logs" "${COUPONOPS_STATE_DIR}"
  chown airflow:0 "${landing}" "${landing}/batches" "${landing}/feedback"
  chmod 0775 "${AIRFLOW_HOME}/logs" "${COUPONOPS_STATE_DIR}" "${landing}" "${landing}/batches" "${landing}/feedback"
  exec gosu airflow "$0" "$@"
fi

fail() {
  echo "airflow-init: $*" >&2
  exit 1
}

# The .env.example placeholders must never reach a running stack.
for name in AIRFLOW__DATABASE__SQL_ALCHEMY_CONN AIRFLOW__CELERY__BROKER_URL AIRFLOW__CORE__FERNET_KEY \
  AIRFLOW__API_AUTH__JWT_SECRET AIRFLOW__API__SECRET_KEY COUPONOPS_WAREHOUSE_URL AIRFLOW_ADMIN_PASSWORD \
  COUPONOPS_PRIVACY__PSEUDONYM_KEY; do
  value="${!name:-}"
  [[ -n "${value}" ]] || fail "${name} is empty; set its variable in .env (README, Production)"
  [[ "${value}" != *change-me* ]] || fail "${name} still holds the .env.example placeholder 'change-me'"
done
# Every process must pseudonymise customer ids with the same key, kept with the warehouse's backups.
(( ${#COUPONOPS_PRIVACY__PSEUDONYM_KEY} >= 16 )) \
  || fail "COUPONOPS_PRIVACY__PSEUDONYM_KEY must have at least 16 characters (secrets.token_urlsafe(32))"
python - <<'PY' || fail "AIRFLOW_FERNET_KEY is not a Fernet key (32 url-safe base64-encoded bytes)"
import os
from cryptography.fernet import Fernet
Fernet(os.environ["AIRFLOW__CORE__FERNET_KEY"])
PY

echo "airflow-init: migrating the Airflow metadata DB"
airflow db migrate
echo "airflow-init: migrating the warehouse (Alembic) and creating the MLflow experiment"
couponops init
echo "airflow-init: admin user ${AIRFLOW_ADMIN_USERNAME}"
# Leaves an existing user (and its password) alone.
airflow users create --role Admin --username "${AIRFLOW_ADMIN_USERNAME}" --password "${AIRFLOW_ADMIN_PASSWORD}" \
  --firstname CouponOps --lastname Admin --email "${AIRFLOW_ADMIN_EMAIL}"
echo "airflow-init: done"
