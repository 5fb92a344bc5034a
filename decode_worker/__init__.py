"""One decode instance: admitting requests whose KV has arrived into reserved blocks, continuous
batching on the shared engine runtime, streaming tokens out, and freeing blocks."""
