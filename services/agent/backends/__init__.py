"""Fulfilment backends: one interface (``base.Backend``), one module per kind."""
