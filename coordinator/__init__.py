"""The coordinator: registry, leases, upload validation, signing, router training, ensembles."""
