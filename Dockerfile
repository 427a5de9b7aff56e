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
ENV TRACKRELAY_VAR_DIR=/var/lib/trackrelay TRACKRELAY_HOST=0.0.0.0
VOLUME /var/lib/trackrelay
EXPOSE 587 465 8080
ENTRYPOINT ["trackrelay"]
CMD ["serve"]
