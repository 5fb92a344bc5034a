"""Choosing each phase's parallelism and pool size from SLOs, workload and cluster: the latency
model, the discrete-event simulator, the search, and the plan `pdserve serve` executes."""
