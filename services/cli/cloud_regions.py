"""Locations of public-cloud region codes that catalogues (SkyPilot's among them) use.

An import that meets one of these regions can add it to the topology with a real
location, so its network links are derived rather than guessed. Coordinates are the
city each provider names for the region.
"""

from __future__ import annotations

# code -> (name, ISO country, lat, lon)
CLOUD_REGIONS: dict[str, tuple[str, str, float, float]] = {
    # AWS
    "us-east-1": ("N. Virginia", "US", 38.95, -77.45), "us-east-2": ("Ohio", "US", 39.96, -83.00),
    "us-west-1": ("N. California", "US", 37.35, -121.96), "us-west-2": ("Oregon", "US", 45.84, -119.70),
    "ca-central-1": ("Montreal", "CA", 45.50, -73.57), "sa-east-1": ("Sao Paulo", "BR", -23.55, -46.63),
    "eu-west-1": ("Ireland", "IE", 53.35, -6.26), "eu-west-2": ("London", "GB", 51.51, -0.13),
    "eu-west-3": ("Paris", "FR", 48.86, 2.35), "eu-central-1": ("Frankfurt", "DE", 50.11, 8.68),
    "eu-north-1": ("Stockholm", "SE", 59.33, 18.07), "eu-south-1": ("Milan", "IT", 45.46, 9.19),
    "ap-northeast-1": ("Tokyo", "JP", 35.68, 139.69), "ap-northeast-2": ("Seoul", "KR", 37.57, 126.98),
    "ap-northeast-3": ("Osaka", "JP", 34.69, 135.50), "ap-southeast-1": ("Singapore", "SG", 1.35, 103.82),
    "ap-southeast-2": ("Sydney", "AU", -33.87, 151.21), "ap-south-1": ("Mumbai", "IN", 19.08, 72.88),
    "ap-east-1": ("Hong Kong", "HK", 22.32, 114.17), "me-central-1": ("UAE", "AE", 25.20, 55.27),
    "me-south-1": ("Bahrain", "BH", 26.07, 50.56), "af-south-1": ("Cape Town", "ZA", -33.92, 18.42),
    # GCP
    "us-central1": ("Iowa", "US", 41.26, -95.86), "us-east1": ("South Carolina", "US", 33.20, -80.01),
    "us-east4": ("N. Virginia", "US", 39.04, -77.49), "us-west1": ("Oregon", "US", 45.60, -121.18),
    "us-west4": ("Las Vegas", "US", 36.17, -115.14), "europe-west1": ("Belgium", "BE", 50.45, 3.82),
    "europe-west4": ("Netherlands", "NL", 53.44, 6.84), "europe-west3": ("Frankfurt", "DE", 50.11, 8.68),
    "asia-east1": ("Taiwan", "TW", 24.05, 120.52), "asia-northeast1": ("Tokyo", "JP", 35.68, 139.69),
    "asia-southeast1": ("Singapore", "SG", 1.35, 103.82),
    # Azure
    "eastus": ("Virginia", "US", 37.37, -79.82), "westus2": ("Washington", "US", 47.23, -119.85),
    "westeurope": ("Netherlands", "NL", 52.37, 4.90), "northeurope": ("Ireland", "IE", 53.35, -6.26),
    "southeastasia": ("Singapore", "SG", 1.28, 103.83), "japaneast": ("Tokyo", "JP", 35.68, 139.77),
    # Lambda Cloud
    "us-south-1": ("Texas", "US", 32.78, -96.80), "us-midwest-1": ("Illinois", "US", 41.88, -87.63),
}
