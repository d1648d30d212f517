# The device-side image: `har` with the agent extra (TensorFlow CPU and LiteRT). It runs
#   - `har agent --config /etc/har/agent.toml` (the default command): a device agent in a
#     container, e.g. replaying a WISDM file ([sensor] kind = "replay") on a test bench. Real
#     wearables run the agent on the host with deploy/systemd/har-agent.service instead;
#   - `har sim --config /etc/har/sim.toml`: many simulated devices and their people in one
#     process (the "sim" service of deploy/docker-compose.yml).
#
#   docker build -f deploy/agent.Dockerfile -t har-agent .     (from the repository root)
#
# The light image has the agent-lite extra instead: LiteRT without TensorFlow, about a tenth of the
# size and memory (deploy/README.md, "Which agent to install"). Its agent runs the bundle's LiteRT
# model (agent.runtime = "auto" finds no TensorFlow); `har sim` runs on LiteRT in either image.
#
#   docker build -f deploy/agent.Dockerfile --build-arg AGENT_EXTRA=agent-lite -t har-agent-lite .
#
# The build context is the repository root; deploy/agent.Dockerfile.dockerignore keeps it to the
# package sources. deploy/trainer.Dockerfile is the same recipe with the trainer extra.

# ---- build: install into a venv, so the runtime stage copies one directory and no pip cache.
FROM python:3.11-slim AS build
ARG AGENT_EXTRA=agent
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY . /src
RUN python -m venv /opt/har/.venv \
 && /opt/har/.venv/bin/pip install --upgrade pip \
 && /opt/har/.venv/bin/pip install "/src[${AGENT_EXTRA}]"

# ---- runtime
FROM python:3.11-slim
# TF_CPP_MIN_LOG_LEVEL=1: TensorFlow's C++ INFO lines are noise in a service log. Two TensorFlow
# threads are plenty for one small model, as in the systemd unit.
ENV PATH=/opt/har/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=1 \
    TF_NUM_INTRAOP_THREADS=2 \
    TF_NUM_INTEROP_THREADS=1
# The same fixed uid/gid as the trainer image, so one `chgrp 10001` makes /etc/har readable to both.
RUN groupadd --system --gid 10001 har \
 && useradd --system --uid 10001 --gid har --home-dir /var/lib/har --shell /usr/sbin/nologin har \
 && install -d -o har -g har -m 0750 /var/lib/har
COPY --from=build /opt/har/.venv /opt/har/.venv
# Outbox, learned state and models (agent.example.toml: /var/lib/har/agent; sim.example.toml:
# /var/lib/har/sim). A named volume mounted here starts as a copy of this directory, owned by har.
WORKDIR /var/lib/har
USER har:har
# SIGTERM: flush the outbox, write the learned state, publish "offline", exit 0.
STOPSIGNAL SIGTERM
CMD ["har", "agent", "--config", "/etc/har/agent.toml"]
