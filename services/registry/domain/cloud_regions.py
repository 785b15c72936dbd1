"""Where a catalogue's region is: provider region codes, location strings and operator maps
turned into topology regions. Pure: reads only the packaged tables next to this module.

A catalogue row names its region in one of many ways: a provider code (``us-east-1``,
``eastus2``, ``eu-amsterdam-1``), a country code (RunPod's ``US``), a location string
(Vast.ai's ``"Oregon, US, NA"``) or nothing usable (``default``). :class:`RegionResolver`
answers, for one cloud, which topology region an offer is in:

1. the operator's ``--region-map`` (code -> existing region id, or a full location);
2. a code that already is a topology region id (the operator's own world);
3. the maintained table ``cloud_regions.csv`` (cloud, code, city, country, coordinates);
4. a location string "City, CC[, continent]": the ISO country code, and the city or state
   from ``places.csv`` when known (else the country's main data-centre city from
   ``countries.csv``); the id is built from the cloud, country and city, never from the
   string itself;
5. a code whose words name a country (ISO 3166 alpha-2 first word, or alpha-3) or a city
   or state of ``places.csv`` (``fin-01``, ``eu-amsterdam-1``, ``US-TX-1``);
6. anything else is unknown, with the reason.

New regions get the id ``<cloud>-<code>`` (sanitised), so the same code at two providers
(Nebius' ``us-central1`` is Kansas City, GCP's is Iowa) never names one place twice.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

from services.common.ids import is_valid_id
from services.common.messages import Region

__all__ = ["Located", "RegionResolver", "country_table", "place_table", "region_table"]

Source = Literal["map", "topology", "table", "location", "derived"]

_SANITISE = re.compile(r"[^a-z0-9]+")
_GLUED_NUMBER = re.compile(r"(?<=[a-z])\d+(?=-|$)")
_ISO3 = {
    "usa": "US", "can": "CA", "gbr": "GB", "deu": "DE", "fra": "FR", "nld": "NL", "fin": "FI", "swe": "SE",
    "nor": "NO", "dnk": "DK", "isl": "IS", "irl": "IE", "ita": "IT", "esp": "ES", "prt": "PT", "pol": "PL",
    "che": "CH", "aut": "AT", "bel": "BE", "cze": "CZ", "jpn": "JP", "kor": "KR", "sgp": "SG", "ind": "IN",
    "aus": "AU", "bra": "BR", "mex": "MX", "zaf": "ZA", "are": "AE", "isr": "IL", "hkg": "HK", "twn": "TW",
    "chn": "CN", "est": "EE", "ltu": "LT", "lva": "LV", "rou": "RO", "bgr": "BG", "grc": "GR", "tur": "TR",
    "uk": "GB",  # not ISO, but how providers write it: OCI's uk-cardiff-1, Spheron's london-uk-1
}
# Metro codes (IATA city codes) that bare-metal providers use as region names (Latitude.sh
# behind Spheron and Prime Intellect: "TYO4", "SYD2", "atl"), -> places.csv keys. A bare
# "FRA" is Frankfurt here, not France's alpha-3 code.
_METRO = {
    "tyo": ("JP", "tokyo"), "syd": ("AU", "sydney"), "atl": ("US", "atlanta"), "lax": ("US", "los-angeles"),
    "dal": ("US", "dallas"), "chi": ("US", "chicago"), "nyc": ("US", "new-york"), "mia": ("US", "miami"),
    "lon": ("GB", "london"), "fra": ("DE", "frankfurt"), "ams": ("NL", "amsterdam"),
    "par": ("FR", "paris"), "sgp": ("SG", "singapore"), "sao": ("BR", "sao-paulo"), "yyz": ("CA", "toronto"),
    "bom": ("IN", "mumbai"),
}
# Continent words that can start a code without naming a country.
_NOT_COUNTRY_WORDS = frozenset({"eu", "ap", "me", "af", "sa", "na", "as", "oc", "eur", "sea", "asia", "europe"})
_CONTINENT_WORDS = _NOT_COUNTRY_WORDS | {"north", "south", "central", "america", "africa", "oceania", "middle", "east",
                                         "latam", "apac", "emea"}


def _slug(text: str) -> str:
    return _SANITISE.sub("-", text.strip().lower()).strip("-")


def _read(name: str) -> list[dict[str, str]]:
    text = resources.files(__package__).joinpath(name).read_text("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


@cache
def region_table() -> Mapping[tuple[str, str], tuple[str, str, float, float]]:
    """(cloud, code) -> (city, ISO country, lat, lon), from ``cloud_regions.csv``."""
    return {(r["cloud"], r["code"].lower()): (r["name"], r["country"], float(r["lat"]), float(r["lon"]))
            for r in _read("cloud_regions.csv")}


@cache
def country_table() -> Mapping[str, tuple[str, float, float]]:
    """ISO country -> (name, lat, lon of its main data-centre city)."""
    return {r["iso2"]: (r["name"], float(r["lat"]), float(r["lon"])) for r in _read("countries.csv")}


@cache
def place_table() -> Mapping[tuple[str, str], tuple[str, float, float]]:
    """(ISO country, place slug) -> (name, lat, lon): states, provinces and cities."""
    return {(r["country"], r["key"]): (r["name"], float(r["lat"]), float(r["lon"])) for r in _read("places.csv")}


@cache
def _places_by_slug() -> Mapping[str, list[tuple[str, str, float, float]]]:
    out: dict[str, list[tuple[str, str, float, float]]] = {}
    for (country, key), (name, lat, lon) in place_table().items():
        out.setdefault(key, []).append((country, name, lat, lon))
        if "-" in key:  # Shadeform writes "kansascity-usa-1", "newyork-usa-1"
            out.setdefault(key.replace("-", ""), []).append((country, name, lat, lon))
    return out


@cache
def _country_by_name() -> Mapping[str, str]:
    return {_slug(name): iso for iso, (name, _, _) in country_table().items()}


@dataclass(frozen=True)
class Located:
    """Where an offer is: the region id, the region to add (None when the topology has
    it already) and how that was decided."""

    id: str
    region: Region | None
    source: Source


def _region_id(*parts: str) -> str:
    rid = "-".join(p for p in (_slug(x) for x in parts) if p)
    return rid[:63].strip("-")


class RegionResolver:
    """Resolve one cloud's region codes against the topology, the tables and a map."""

    def __init__(self, cloud: str, known: Mapping[str, Region] | set[str] | frozenset[str],
                 region_map: Mapping[str, Region | str] | None = None) -> None:
        self.cloud = _slug(cloud) or "cloud"
        self.known = set(known)
        self.map = {k.strip().lower(): v for k, v in (region_map or {}).items()}
        self._seen: dict[tuple[str, str], Located | str] = {}

    def locate(self, raw: str, zone: str = "") -> Located | str:
        """The region of an offer, or the reason there is none (a one-line string)."""
        key = (raw, zone)
        if key not in self._seen:
            self._seen[key] = self._locate(raw, zone)
        return self._seen[key]

    def _locate(self, raw: str, zone: str) -> Located | str:
        code = raw.strip()
        key = code.lower()
        if key in self.map:
            target = self.map[key]
            if isinstance(target, Region):
                return Located(target.id, None if target.id in self.known else target, "map")
            if target not in self.known:
                return f"--region-map sends {code!r} to {target!r}, which is not a topology region"
            return self._existing(target, "map")
        if not code:
            return "empty Region"
        if key in self.known:
            return self._existing(key, "topology")
        if (self.cloud, key) in region_table():
            name, country, lat, lon = region_table()[(self.cloud, key)]
            return self._new(_region_id(self.cloud, key), name, country, lat, lon, "table")
        if "," in code or " " in code.strip():
            return self._from_location(code)
        return self._derive(code, zone)

    # --- helpers -----------------------------------------------------------------------
    @staticmethod
    def _existing(rid: str, source: Source) -> Located:
        return Located(rid, None, source)

    def _new(self, rid: str, name: str, country: str, lat: float, lon: float, source: Source) -> Located | str:
        if not is_valid_id(rid):
            return f"cannot make a region id from {rid!r}"
        if rid in self.known:
            return Located(rid, None, source)
        return Located(rid, Region(id=rid, name=name, country=country, lat=lat, lon=lon, kind="cloud"), source)

    def _from_location(self, text: str) -> Located | str:
        parts = [p.strip() for p in text.split(",")]
        country = next((p.upper() for p in parts if len(p) == 2 and p.upper() in country_table()), None)
        if country is None and len(parts) == 1:
            # "Finland 3" (Spheron): a country's name and a number
            words = [w for w in _slug(text).split("-") if not w.isdigit()]
            country = _country_by_name().get("-".join(words))
            if country is not None:
                numbers = [w for w in _slug(text).split("-") if w.isdigit()]
                return self._new(_region_id(self.cloud, country, *numbers), country_table()[country][0], country,
                                 *country_table()[country][1:], "location")
        if country is None and len(parts) == 1:
            derived = self._derive(text, "")  # SimplePod's "North America-CA": a code with a space
            if isinstance(derived, Located):
                return derived
        if country is None:
            return f"location {text!r} names no ISO country code; map it with --region-map"
        place = next((p for p in parts if p and p.upper() != country and len(p) > 3), "")
        return self._at(country, _slug(place), "location")

    def _at(self, country: str, place: str, source: Source) -> Located | str:
        cname, lat, lon = country_table()[country]
        if place and (country, place) in place_table():
            name, lat, lon = place_table()[(country, place)]
            return self._new(_region_id(self.cloud, country, place), name, country, lat, lon, source)
        if place and _slug(cname) != place:
            # a city we cannot place: the country's hub, but its own region id
            return self._new(_region_id(self.cloud, country, place), f"{place} ({cname})", country, lat, lon, source)
        return self._new(_region_id(self.cloud, country), cname, country, lat, lon, source)

    def _derive(self, code: str, zone: str) -> Located | str:
        # "IN2", "MON1": a trailing number glued to the name is still a number
        words = [w for w in _GLUED_NUMBER.sub("", _slug(code)).split("-") if w and not w.isdigit()]
        if not words:
            return f"region {code!r} names no place; map it with --region-map"
        countries = country_table()
        country: str | None = None
        if len(words) == 1 and words[0] in _METRO and _METRO[words[0]] in place_table():
            name, lat, lon = place_table()[_METRO[words[0]]]
            return self._new(_region_id(self.cloud, code), name, _METRO[words[0]][0], lat, lon, "derived")
        if words[0].upper() in countries and words[0] not in _NOT_COUNTRY_WORDS:
            country = words[0].upper()
        elif words[0] in _ISO3:
            country = _ISO3[words[0]]
        elif len(words) >= 2 and words[-1] in _ISO3:
            country = _ISO3[words[-1]]  # "<city>-<iso3>-<n>" (Shadeform, Spheron): "casper-usa-1"
        else:
            country = next((_country_by_name().get(w) for w in words if w in _country_by_name()), None)
        # a place word (or two words: "north-carolina", "sao-paulo") anywhere in the code
        spans = [("-".join(words[i:i + 2])) for i in range(len(words) - 1)] + words
        for span in spans:
            hits = _places_by_slug().get(span, [])
            hits = [h for h in hits if country is None or h[0] == country]
            if len(hits) == 1:
                c, name, lat, lon = hits[0]
                # a bare place name ("Iowa") is a location, not an id: the id says country and place
                rid = _region_id(self.cloud, c, span) if span == "-".join(words) else _region_id(self.cloud, code)
                return self._new(rid, name, c, lat, lon, "derived")
        if country is None and len(words) >= 2 and words[1].upper() in countries and words[0] in _NOT_COUNTRY_WORDS:
            country = words[1].upper()  # "EU-CZ-1", "AP-JP-1"
        if (country is None and len(words) >= 2 and words[-1].upper() in countries
                and all(w in _CONTINENT_WORDS for w in words[:-1])):
            country = words[-1].upper()  # SimplePod's "Europe-NO", "North America-CA"
        if country is not None and _slug(code) in _country_by_name():
            # a bare country name ("FINLAND") is a location, not an id
            cname, lat, lon = countries[country]
            return self._new(_region_id(self.cloud, country), cname, country, lat, lon, "derived")
        if country is not None:
            cname, lat, lon = countries[country]
            if len(words) >= 2 and country == "US" and (zone_hit := self._us_state(words[1])):
                return self._new(_region_id(self.cloud, code), zone_hit[0], "US", zone_hit[1], zone_hit[2], "derived")
            return self._new(_region_id(self.cloud, code), cname, country, lat, lon, "derived")
        if zone and zone.strip().lower() != code.lower():
            found = RegionResolver(self.cloud, set())._derive(zone, "")
            if isinstance(found, Located) and found.region is not None:
                r = found.region
                return self._new(_region_id(self.cloud, code), r.name, r.country, r.lat, r.lon, "derived")
        return f"region {code!r} is not in the table and names no country or city; map it with --region-map"

    @staticmethod
    def _us_state(word: str) -> tuple[str, float, float] | None:
        state = _US_STATES.get(word)
        if state is None:
            return None
        return place_table().get(("US", state))


# USPS codes RunPod-style zones use ("US-TX-1") -> places.csv keys.
_US_STATES = {
    "va": "virginia", "oh": "ohio", "ca": "california", "or": "oregon", "wa": "washington", "ia": "iowa",
    "tx": "texas", "il": "illinois", "ga": "georgia", "fl": "florida", "mi": "michigan", "mt": "montana",
    "nc": "north-carolina", "sc": "south-carolina", "md": "maryland", "az": "arizona", "nv": "nevada",
    "ut": "utah", "co": "colorado", "ny": "new-york", "nj": "new-jersey", "pa": "pennsylvania",
    "ma": "massachusetts", "ks": "kansas", "mo": "missouri", "ne": "nebraska", "mn": "minnesota",
    "wi": "wisconsin", "in": "indiana", "tn": "tennessee", "ok": "oklahoma", "de": "delaware", "id": "idaho",
    "nm": "new-mexico", "la": "louisiana", "ky": "kentucky", "al": "alabama", "nh": "new-hampshire",
    "ct": "connecticut",
}
