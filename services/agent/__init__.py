"""``cbroker agent``: the provider's side. Discovers the host's accelerators, keeps the
provider's pools live, and turns each lease assigned to them into running work through a
backend (``process``, ``slurm``, ``kubernetes``). A client of the broker's and registry's
HTTP APIs only: it imports ``services.common`` and nothing of the services it talks to."""
