# Prometheus from Debian's package, for where Docker Hub's prom/prometheus cannot be pulled (our CI, an
# air-gapped box). deploy/prometheus-image.sh builds it (`make images` runs that) on the same Debian base
# as Charles' images, and docker-compose.yml runs it when PROMETHEUS_IMAGE names it. It behaves like
# Docker Hub's image where compose relies on it: flags as the command, data in /prometheus owned by
# nobody, and wget for the healthcheck. Debian bookworm's Prometheus is 2.42 (Docker Hub's: 3.5); our
# configuration reads the same in both (`make validate` checks it with Debian's promtool).
ARG BASE=charles-base:bookworm
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus wget \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus \
 && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
