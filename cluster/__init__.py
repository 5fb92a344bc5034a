"""The product users run: config files, controller/router, Ray actor pools, front ends, the CLI."""
