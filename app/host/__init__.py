"""The host: child processes that die with us, trusted files, the workers of `--workers N` and the services
they share, free ports."""
