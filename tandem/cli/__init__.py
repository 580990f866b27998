"""The `tandem` command: argument parsing and terminal I/O only; the work happens in `runtime`."""
