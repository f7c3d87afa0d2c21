"""Speed and memory benchmarks of nodeseg: ``python -m benchmarks`` runs them all (see benchmarks/README.md)."""
