"""The meter: allocation events in, an exactly-once usage ledger, invoices and budgets out."""
