# leadstage-sync: one image for every service (worker, webhook, fake-ivvy); the compose file
# picks the subcommand. `docker build -t leadstage-sync .`

# Every dependency comes from the lock files (requirements/*.txt, refreshed by scripts/lock.sh):
# pinned versions, each file checked against its hash, so a rebuild installs what CI tested.

# --- build: a wheel of the project, so the runtime image holds no source tree or build tools.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements/ requirements/
RUN pip install --require-hashes --no-deps -r requirements/build.txt
COPY pyproject.toml README.md ./
COPY worker/ worker/
COPY producers/ producers/
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# --- runtime
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY requirements/ /tmp/requirements/
COPY --from=build /wheels /wheels
# The locked dependencies (all have manylinux wheels: no compiler needed), then the project alone.
RUN pip install --require-hashes --no-deps -r /tmp/requirements/runtime.txt && pip install --no-deps /wheels/*.whl \
    && rm -rf /wheels /tmp/requirements \
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
