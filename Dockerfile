FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY chainrule chainrule
COPY server server
COPY client client
RUN pip install --no-cache-dir . && mkdir -p /data
VOLUME /data
EXPOSE 50051
CMD ["chainrule", "serve", "--host", "0.0.0.0", "--port", "50051", "--db", "/data/chainrule.db"]
