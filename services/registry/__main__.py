"""``python -m services.registry``: serve the registry with uvicorn."""

from services.common.serve import serve

serve("registry", "services.registry.app:create_app")
