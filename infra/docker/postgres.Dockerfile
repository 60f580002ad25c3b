# PostgreSQL from Debian's packages on smelt's local base image (no registry image needed):
# `bash infra/docker/base-image.sh smelt-base:latest` makes the base (`smelt containerize` tags it too).
FROM smelt-base:latest
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /var/lib/postgresql/data /run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /run/postgresql
COPY infra/docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
USER postgres
ENV PGDATA=/var/lib/postgresql/data PATH=/usr/lib/postgresql/15/bin:$PATH
ENTRYPOINT ["bash", "/usr/local/bin/postgres-entrypoint.sh"]
