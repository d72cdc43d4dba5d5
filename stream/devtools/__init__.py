"""Development tooling: the local broker, the provider simulator, the demo and the bench."""
