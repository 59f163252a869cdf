# amibake on the official Airflow image: our providers, the operators package, the DAGs and the
# box-side build scripts. Connections and secrets are NOT baked in: they come from the environment
# (.env / docker-compose.yaml) or a secrets backend at run time.
ARG AIRFLOW_VERSION=3.3.2
FROM apache/airflow:${AIRFLOW_VERSION}-python3.11 AS airflow
ARG AIRFLOW_VERSION

# The package (operators/ only: the offline harness rehearsal/ stays out) and the scripts it ships
# to the build box.
COPY --chown=airflow:0 pyproject.toml /opt/amibake/
COPY --chown=airflow:0 operators /opt/amibake/operators
COPY --chown=airflow:0 include /opt/amibake/include
# Pinning apache-airflow to the image's version keeps pip from up- or downgrading Airflow itself.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /opt/amibake
COPY --chown=airflow:0 dags /opt/airflow/dags
# The image definitions: one DAG amibake_<name> per images/<name>.yaml (mount your own folder over it).
COPY --chown=airflow:0 images /opt/amibake/images
# The installed package lives in site-packages; point it at the scripts and definitions copied above.
ENV AIRFLOW__AMIBAKE__SCRIPTS_DIR=/opt/amibake/include/scripts
ENV AIRFLOW__AMIBAKE__IMAGES_DIR=/opt/amibake/images

# Optional (compose profile "local-ec2"): the same image plus moto, to try the DAGs against a local
# EC2 API without an AWS account.
FROM airflow AS local-ec2
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" "moto[server,ec2]==5.2.5"
