"""One prefill instance: its queue and batching policy, running prefill on the shared engine runtime,
sending KV layer by layer, and holding blocks under a lease until decode acknowledges them."""
