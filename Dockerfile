# mailproc: a slim image running `mailproc serve` as an unprivileged user.
# The install steps are the Makefile's: a virtualenv, then `pip install` of this project.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/mailproc \
    PATH=/opt/mailproc/bin:$PATH

RUN groupadd --system mailproc \
    && useradd --system --gid mailproc --home-dir /var/lib/mailproc --shell /usr/sbin/nologin mailproc \
    && install -d -o mailproc -g mailproc -m 0750 /var/lib/mailproc

WORKDIR /src
COPY pyproject.toml README.md ./
COPY mailproc ./mailproc
RUN python -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/python" -m pip install . \
    && rm -rf /src

COPY rules /etc/mailproc/rules
COPY templates /etc/mailproc/templates
COPY config.example.toml /etc/mailproc/config.example.toml

# In a container the listeners must face the network, and the database lives in the volume.
# Any setting can be overridden with MAILPROC_<SECTION>_<KEY> or a file in MAILPROC_CONFIG;
# set MAILPROC_WEB_BASE_URL to the console's address behind your TLS proxy.
ENV MAILPROC_SMTP_LISTEN=0.0.0.0:2525 \
    MAILPROC_WEB_LISTEN=0.0.0.0:8025 \
    MAILPROC_DATABASE_URL=sqlite:////var/lib/mailproc/mailproc.db \
    MAILPROC_TEMPLATES_PATH=/etc/mailproc/templates \
    MAILPROC_RULES_PATH=/etc/mailproc/rules

USER mailproc
WORKDIR /var/lib/mailproc
VOLUME ["/var/lib/mailproc"]
EXPOSE 2525 8025

# Healthy means ready: the database answers, the SMTP listener is bound and the scheduler runs
# (GET /readyz on the console's port).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ['MAILPROC_WEB_LISTEN'].rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=4)"]

STOPSIGNAL SIGTERM
CMD ["mailproc", "serve"]
