"""Docker, Compose, Kubernetes, Prometheus and Grafana."""
