# The worker image: `docker compose` runs every `stream` command from it.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY topics ./topics
RUN pip install --no-cache-dir . && useradd --system --uid 10001 stream
ENV STREAM_TOPICS_DIR=/app/topics
USER stream
EXPOSE 9400
ENTRYPOINT ["stream"]
CMD ["--help"]
