"""Re-running history: replay a time window of requests, re-drive dead letters."""
