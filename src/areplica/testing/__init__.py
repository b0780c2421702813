"""Test helpers: a real local PostgreSQL topology (``areplica.testing.topology``), a fault
injecting TCP proxy (``areplica.testing.proxy``) and pytest fixtures (``.plugin``)."""
