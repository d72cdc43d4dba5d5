# The worker image: `docker compose` and the Kubernetes manifests run every `stream`
# command from it. It installs the wheel, exactly what `pip install` gives anyone else:
# the topic declarations and schemas travel inside the package (stream/data/topics).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY topics ./topics
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 stream
USER 10001
EXPOSE 9400
ENTRYPOINT ["stream"]
CMD ["--help"]
