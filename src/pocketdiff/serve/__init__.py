"""``pocketdiff serve``: a local image server (OpenAI images API, a web page, Prometheus metrics, micro-batching)."""
