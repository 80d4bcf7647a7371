# leadstage-sync: one image for every service (worker, webhook, fake-ivvy); the compose file
# picks the subcommand. `docker build -t leadstage-sync .`

# --- build: a wheel of the project, so the runtime image holds no source tree or build tools.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker/ worker/
COPY producers/ producers/
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
# Installs the project and its dependencies (all have manylinux wheels: no compiler needed).
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && groupadd --system --gid 10001 leadstage \
    && useradd --system --uid 10001 --gid leadstage --create-home --home-dir /home/leadstage \
        --shell /usr/sbin/nologin leadstage
WORKDIR /home/leadstage
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# The worker's metrics, the webhook, the fake iVvy (each service uses one).
EXPOSE 9464 8080 8765
ENTRYPOINT ["leadstage"]
CMD ["worker"]
