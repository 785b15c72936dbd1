"""``python -m services.meter``: serve the meter with uvicorn."""

from services.common.serve import serve

serve("meter", "services.meter.app:create_app")
