"""Wire contracts: `.proto` files for the public serving API and the KV-transfer service.
Generated stubs are produced from them at build time and never edited by hand."""
