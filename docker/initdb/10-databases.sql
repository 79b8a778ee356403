-- Runs once, on the first start of an empty postgres-data volume, as POSTGRES_USER (the owner of all three).
-- airflow (Airflow's metadata DB) is created by the image itself from POSTGRES_DB.
CREATE DATABASE mlflow;     -- MLflow tracking and model registry (backend store)
CREATE DATABASE couponops;  -- the warehouse: the ledger of campaigns, allocations, deliveries and feedback
