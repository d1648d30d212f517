# The trainer service image: `har` with the trainer extra (TensorFlow CPU, matplotlib, tqdm) and
# the postgres extra (psycopg, for a PostgreSQL store).
# It also runs the central side's one-off commands: har keys, har train, har models, har data.
#
#   docker build -f deploy/trainer.Dockerfile -t har-trainer .     (from the repository root)
#
# The build context is the repository root; deploy/trainer.Dockerfile.dockerignore keeps it to
# the package sources (without it, the 1.6 GB .venv and .git would be sent to the builder).
# deploy/agent.Dockerfile is the same recipe with the agent extra.

# ---- build: install into a venv, so the runtime stage copies one directory and no pip cache.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY . /src
# Not editable: the runtime image holds the installed package, not the sources.
RUN python -m venv /opt/har/.venv \
 && /opt/har/.venv/bin/pip install --upgrade pip \
 && /opt/har/.venv/bin/pip install '/src[trainer,postgres]'

# ---- runtime
FROM python:3.11-slim
# TF_CPP_MIN_LOG_LEVEL=1: TensorFlow's C++ INFO lines are noise in a service log (warnings and
# errors still show). MPLCONFIGDIR: matplotlib (confusion-matrix plots) wants a writable cache.
ENV PATH=/opt/har/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=1 \
    MPLCONFIGDIR=/var/lib/har/.cache/matplotlib
# A fixed uid/gid, so host files mounted into /etc/har can be made readable to it (chgrp 10001).
RUN groupadd --system --gid 10001 har \
 && useradd --system --uid 10001 --gid har --home-dir /var/lib/har --shell /usr/sbin/nologin har \
 && install -d -o har -g har -m 0750 /var/lib/har
COPY --from=build /opt/har/.venv /opt/har/.venv
# A named volume mounted here starts as a copy of this directory: owned by har, so it is writable.
WORKDIR /var/lib/har
USER har:har
# har exits 0 after SIGTERM once it has flushed and written its state.
STOPSIGNAL SIGTERM
CMD ["har", "trainer", "serve", "--config", "/etc/har/trainer.toml"]
