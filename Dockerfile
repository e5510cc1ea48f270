# One image for every multillm service of docker-compose.yml. The entrypoint is the
# `multillm` command; the service's command picks the role:
#   docker run IMAGE worker primary --concurrency 8
#   docker run IMAGE worker model --model mock/upper
#   docker run IMAGE mock-llm --host 0.0.0.0
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md constraints.txt /src/
COPY multillm /src/multillm
RUN pip install -c /src/constraints.txt '/src[postgres]' && rm -rf /src

# A non-root user; its home is the working folder (a sqlite:/// or jsonl:/// sink with a
# relative path lands there).
RUN useradd --create-home --home-dir /app --uid 10001 --user-group multillm
USER multillm
WORKDIR /app

ENTRYPOINT ["multillm"]
CMD ["--help"]
