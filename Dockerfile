# syntax=docker/dockerfile:1
#
# The appliance as a container image:
#   docker build -t appliance .
#   docker run --stop-timeout 15 -v "$PWD/my-config:/etc/appliance:ro" \
#       -v appliance-state:/var/lib/appliance -p 127.0.0.1:1143:1143 appliance
# The config is read from /etc/appliance/appliance.yaml (mount a folder, not a single file,
# so that hot reload sees an edited or swapped file). Learned known-servers records are kept
# in the /var/lib/appliance volume; name it, or each new container starts without them.
# --stop-timeout must exceed limits.shutdown_grace_period (8 s by default), because
# docker stop and podman stop send SIGKILL after 10 s unless told otherwise.
# Podman: `podman build --format docker`, because the default OCI format drops HEALTHCHECK.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Stage 1: wheels of the appliance and of every dependency, uvloop included, so that the
# final stage installs without a compiler and without network access.
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY appliance ./appliance
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels ".[fast]"

# Stage 2: the runtime image.
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 appliance \
    && useradd --system --uid 10001 --gid appliance --no-create-home \
        --home-dir /var/lib/appliance --shell /usr/sbin/nologin appliance
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links /wheels "appliance[fast]"
RUN mkdir -p /etc/appliance /var/lib/appliance \
    && chown appliance:appliance /var/lib/appliance

# APPLIANCE_CONFIG is set so that a missing config mount fails at start with a clear
# message, instead of running with no listeners. APPLIANCE_EVENT_LOOP=auto uses uvloop.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    APPLIANCE_CONFIG=/etc/appliance/appliance.yaml \
    APPLIANCE_EVENT_LOOP=auto

VOLUME ["/var/lib/appliance"]
# IMAP, POP3, IMAPS and POP3S as the container examples bind them (ports above 1024, so
# no capability is needed), and the admin listener.
EXPOSE 1143 1110 1993 1995 9143

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /var/lib/appliance

# Asks the admin listener's /healthz, or without one connects to every listener.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["appliance", "healthcheck"]
# SIGTERM: stop accepting, let sessions finish within limits.shutdown_grace_period, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["appliance"]
CMD ["run"]
