# trackrelay: one image for the relay, the receiver and the migrations.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY relay ./relay
COPY receiver ./receiver
COPY shared ./shared
COPY trackrelay ./trackrelay
RUN pip install . && useradd --system --home /var/lib/trackrelay trackrelay \
    && mkdir -p /var/lib/trackrelay && chown trackrelay /var/lib/trackrelay

USER trackrelay
# A fixed mmap threshold: large messages go back to the OS when freed (README, Limits).
ENV TRACKRELAY_VAR_DIR=/var/lib/trackrelay TRACKRELAY_HOST=0.0.0.0 MALLOC_MMAP_THRESHOLD_=1048576
VOLUME /var/lib/trackrelay
EXPOSE 587 465 8080
ENTRYPOINT ["trackrelay"]
CMD ["serve"]
