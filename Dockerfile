# omniroute: one image for the router, every consumer stage and the CLI.
#   docker build -t omniroute:local .
#   docker run --rm omniroute:local --help
# compose.yaml builds it and runs `serve`, `consume <stage>` and `migrate` from it.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMNIROUTE_CONFIG=/etc/omniroute/omniroute.yaml

RUN groupadd --system --gid 10001 omniroute \
    && useradd --system --uid 10001 --gid omniroute --home-dir /home/omniroute \
       --create-home --shell /usr/sbin/nologin omniroute \
    && mkdir -p /etc/omniroute

# Only what the package needs (pyproject.toml reads README.md); no tests, no dev extras.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY router/ router/
COPY consumers/ consumers/
COPY omniroute/ omniroute/
RUN pip install . \
    && cd / && rm -rf /src

WORKDIR /home/omniroute
USER omniroute

# The router's HTTP port (OMNIROUTE_HTTP_PORT): Twilio webhooks, /healthz, /readyz, /metrics.
EXPOSE 8080
# SIGTERM drains: stop taking work, finish in-flight messages, ack, close.
STOPSIGNAL SIGTERM
ENTRYPOINT ["omniroute"]
CMD ["run"]
