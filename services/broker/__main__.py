"""``python -m services.broker``: serve the broker with uvicorn."""

from services.common.serve import serve

serve("broker", "services.broker.app:create_app")
