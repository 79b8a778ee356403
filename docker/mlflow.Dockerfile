# MLflow tracking server for docker-compose.yml: the official image plus the PostgreSQL driver its
# postgresql+psycopg:// backend store needs, run as a non-root user that owns the artifact volume.
ARG MLFLOW_VERSION=3.17.2
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}
RUN pip install --no-cache-dir "psycopg[binary]>=3.2" \
 && useradd --uid 50001 --gid 0 --create-home --home-dir /home/mlflow --shell /bin/bash mlflow \
 && install -d -o mlflow -g 0 -m 0775 /mlartifacts
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
