"""What operators watch: consumer lag and its status, Prometheus metrics, health."""
