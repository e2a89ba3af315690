"""Layerlog benchmarks against the issue's limits: `make bench` (python -m bench).

Every figure is measured next to a baseline that does the same work without Layerlog (minio
straight to the same S3 server, a bare aiohttp server, a plain Kafka consumer, ...) in the same
run, because the machines are shared and noisy: a ratio survives noise that absolute numbers do
not. The run writes bench/RESULTS.md and PNG plots in bench/; scratch data goes to bench/out/.
"""
