"""The OpenAPI 3.1 description of the registry's JSON API v1 (served at
``/api/v1/openapi.json``)."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["document"]

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_ID = {"type": "string", "pattern": "^[0-9a-f]{32}$"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": _json(schema)}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Bad parameter or body",
        401: "Access document missing, stale, replayed or not for this registry",
        404: "Unknown (or deleted)",
        410: "Deleted by its host: the body's `deletion` is the signed deletion",
        409: "Conflict with what the registry holds (stale, replayed, deleted, quota)",
        413: "Body too large",
        415: "Body is not application/json",
        422: "Malformed, forged or altered signed document",
        429: "Rate limited (see Retry-After)",
    }
    return {str(s): {"description": text[s], "content": _json(_ref("Error"))} for s in statuses}


def _signed_body(name: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": f"A {name} in its wire form: canonical JSON, sent byte for byte.",
        "content": _json(_ref("SignedWire")),
    }


def _param(name: str, where: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": description,
    }


_LISTING_ID = _param("id", "path", _ID, "The listing's ID (32 lowercase hex).")
_PAGE = [
    _param(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "maximum": 100},
        "Most results in the page; fewer come when they are large (a page stays under "
        "3 MiB): the next page starts at offset + the results sent.",
    ),
    _param("offset", "query", {"type": "integer", "minimum": 0, "maximum": 10000}, "Skip."),
]
_SESSION_PAGE = [
    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 20}, "Page size."),
    _param("offset", "query", {"type": "integer", "minimum": 0, "maximum": 10000}, "Skip."),
]
_ACCESS = _param(
    "X-Duet-Access",
    "header",
    {"type": "string", "maxLength": 1024},
    "A signed access document (base64url) naming this registry's public_url as audience.",
)
_WRITE_ERRORS = (400, 409, 413, 415, 422, 429)

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
    },
    "SignedWire": {
        "type": "object",
        "description": "A signed document: canonical JSON of this envelope.",
        "required": ["v", "body", "key", "sig"],
        "additionalProperties": False,
        "properties": {
            "v": {"const": 1},
            "body": {"type": "object"},
            "key": {"type": "string", "description": "Ed25519 public key, base64url"},
            "sig": {"type": "string", "description": "Ed25519 signature, base64url"},
        },
    },
    "Info": {
        "type": "object",
        "required": ["name", "api", "public_url"],
        "properties": {
            "name": {"type": "string"},
            "api": {"const": 1},
            "public_url": {"type": "string", "format": "uri"},
        },
    },
    "Rating": {
        "type": "object",
        "required": ["count", "average"],
        "properties": {"count": {"type": "integer"}, "average": _NUMBER_OR_NULL},
    },
    "Listing": {
        "type": "object",
        "description": "A listing's current version. Only `signed` is the owner's word; "
        "clients verify it. Presence and rating are the registry's.",
        "required": [
            "id",
            "host_id",
            "kind",
            "version",
            "name",
            "summary",
            "modality",
            "license",
            "keywords",
            "created_at",
            "updated_at",
            "published_at",
            "last_seen",
            "online",
            "rating",
            "signed",
        ],
        "properties": {
            "id": _ID,
            "host_id": _ID,
            "kind": {"enum": ["dataset", "model"]},
            "version": {"type": "integer", "minimum": 1},
            "name": {"type": "string"},
            "summary": {"type": "string"},
            "modality": {"type": "string"},
            "license": {"type": "string", "description": "SPDX identifier"},
            "keywords": {"type": "array", "items": {"type": "string"}},
            "created_at": {"type": "number"},
            "updated_at": {"type": "number"},
            "published_at": {"type": "number"},
            "last_seen": _NUMBER_OR_NULL,
            "online": {"type": "boolean"},
            "rating": _ref("Rating"),
            "signed": {"type": "string", "description": "The SignedListing wire, as text"},
        },
    },
    "ListingPage": {
        "type": "object",
        "required": ["total", "limit", "offset", "results"],
        "properties": {
            "total": {"type": "integer", "description": "Matches, counted up to 1,000"},
            "total_at_least": {
                "type": "boolean",
                "description": "True when total is a lower bound (1,000 or more match)",
            },
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "results": {"type": "array", "items": _ref("Listing")},
        },
    },
    "Host": {
        "type": "object",
        "required": ["host_id", "last_seen", "online", "listings"],
        "properties": {
            "host_id": _ID,
            "last_seen": _NUMBER_OR_NULL,
            "online": {"type": "boolean"},
            "listings": {"type": "array", "items": _ref("Listing"), "maxItems": 100},
            "truncated": {
                "type": "boolean",
                "description": "Some listings were left out to keep the answer under 3 MiB.",
            },
        },
    },
    "Review": {
        "type": "object",
        "required": ["listing_id", "reviewer_id", "stars", "text", "at", "signed"],
        "properties": {
            "listing_id": _ID,
            "reviewer_id": _ID,
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            "text": {"type": "string", "maxLength": 2000},
            "at": {"type": "number"},
            "signed": {"type": "string", "description": "The SignedReview wire, as text"},
        },
    },
    "ReviewPage": {
        "type": "object",
        "required": ["total", "average", "results"],
        "properties": {
            "total": {"type": "integer"},
            "average": _NUMBER_OR_NULL,
            "results": {"type": "array", "items": _ref("Review")},
        },
    },
    "Session": {
        "type": "object",
        "description": "A session request and its replies. Clients re-verify the wires and "
        "recompute the status themselves.",
        "required": [
            "request_id",
            "listing_id",
            "host_id",
            "scientist_id",
            "status",
            "start",
            "created_at",
            "request",
            "replies",
        ],
        "properties": {
            "request_id": _ID,
            "listing_id": _ID,
            "host_id": _ID,
            "scientist_id": _ID,
            "status": {"enum": ["pending", "accepted", "declined", "proposed", "withdrawn"]},
            "start": {**_NUMBER_OR_NULL, "description": "Agreed start, UTC epoch seconds"},
            "created_at": {"type": "number"},
            "request": {"type": "string", "description": "The SignedSessionRequest wire"},
            "replies": {"type": "array", "items": {"type": "string"}},
        },
    },
    "SessionList": {
        "type": "object",
        "required": ["results"],
        "properties": {"results": {"type": "array", "items": _ref("Session")}},
    },
}

_PATHS: dict[str, Any] = {
    "/api/v1": {
        "get": {
            "operationId": "info",
            "summary": "Name of the registry, API version, and the public URL to name in "
            "access documents",
            "responses": {"200": _ok("Registry info", _ref("Info"))},
        }
    },
    "/api/v1/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "responses": {"200": _ok("OpenAPI 3.1 document", {"type": "object"})},
        }
    },
    "/api/v1/listings": {
        "get": {
            "operationId": "searchListings",
            "summary": "Full-text search with filters; newest first without a query",
            "parameters": [
                _param("q", "query", {"type": "string", "maxLength": 500}, "Words to find."),
                _param("kind", "query", {"enum": ["dataset", "model"]}, "Only this kind."),
                _param("modality", "query", {"type": "string"}, "Only this modality."),
                _param("license", "query", {"type": "string"}, "Only this SPDX license."),
                _param("keyword", "query", {"type": "string"}, "Only with this keyword."),
                _param(
                    "online",
                    "query",
                    {"enum": ["true", "false", "1", "0"]},
                    "true: only listings whose host was seen lately.",
                ),
                *_PAGE,
            ],
            "responses": {
                "200": _ok("A page of listings", _ref("ListingPage")),
                **_errors(400, 429),
            },
        },
        "post": {
            "operationId": "publishListing",
            "summary": "Publish a listing (version 1) or an edit (the next version)",
            "requestBody": _signed_body("SignedListing"),
            "responses": {
                "201": _ok(
                    "Published", {"type": "object", "properties": {"listing": _ref("Listing")}}
                ),
                "200": _ok(
                    "Edited, or the same version sent again",
                    {"type": "object", "properties": {"listing": _ref("Listing")}},
                ),
                **_errors(*_WRITE_ERRORS),
            },
        },
    },
    "/api/v1/listings/{id}": {
        "get": {
            "operationId": "getListing",
            "summary": "A listing's current version",
            "parameters": [_LISTING_ID],
            "responses": {
                "200": _ok("The listing", _ref("Listing")),
                **_errors(404, 410, 429),
            },
        },
        "delete": {
            "operationId": "deleteListing",
            "summary": "Delete a listing by its host's signed deletion",
            "parameters": [_LISTING_ID],
            "requestBody": _signed_body("SignedDeletion"),
            "responses": {
                "200": _ok("Deleted", {"type": "object", "properties": {"deleted": _ID}}),
                **_errors(404, *_WRITE_ERRORS),
            },
        },
    },
    "/api/v1/listings/{id}/croissant.json": {
        "get": {
            "operationId": "getCroissant",
            "summary": "The listing as Croissant 1.1 JSON-LD",
            "parameters": [_LISTING_ID],
            "responses": {
                "200": {
                    "description": "Croissant JSON-LD",
                    "content": {"application/ld+json": {"schema": {"type": "object"}}},
                },
                **_errors(404, 429),
            },
        }
    },
    "/api/v1/listings/{id}/reviews": {
        "get": {
            "operationId": "listReviews",
            "summary": "Signed reviews of a listing",
            "parameters": [_LISTING_ID, *_PAGE],
            "responses": {"200": _ok("Reviews", _ref("ReviewPage")), **_errors(400, 404, 429)},
        },
        "post": {
            "operationId": "postReview",
            "summary": "Review a listing (a newer review by the same reviewer replaces it)",
            "parameters": [_LISTING_ID],
            "requestBody": _signed_body("SignedReview"),
            "responses": {
                "201": _ok("Stored", {"type": "object", "properties": {"review": _ref("Review")}}),
                "200": _ok(
                    "Replaced an older review",
                    {"type": "object", "properties": {"review": _ref("Review")}},
                ),
                **_errors(404, *_WRITE_ERRORS),
            },
        },
    },
    "/api/v1/sessions": {
        "post": {
            "operationId": "requestSession",
            "summary": "Send a signed session request to a listing's host",
            "requestBody": _signed_body("SignedSessionRequest"),
            "responses": {
                "201": _ok("Sent", {"type": "object", "properties": {"session": _ref("Session")}}),
                **_errors(404, *_WRITE_ERRORS),
            },
        },
        "get": {
            "operationId": "mySessions",
            "summary": "Sessions the identity in the access document requested",
            "parameters": [_ACCESS, *_SESSION_PAGE],
            "responses": {"200": _ok("Sessions", _ref("SessionList")), **_errors(400, 401, 429)},
        },
    },
    "/api/v1/sessions/{request_id}/replies": {
        "post": {
            "operationId": "replySession",
            "summary": "Answer a session request (accept, decline, propose, withdraw)",
            "parameters": [_param("request_id", "path", _ID, "The session request's ID.")],
            "requestBody": _signed_body("SignedSessionReply"),
            "responses": {
                "201": _ok(
                    "Stored", {"type": "object", "properties": {"session": _ref("Session")}}
                ),
                **_errors(404, *_WRITE_ERRORS),
            },
        }
    },
    "/api/v1/inbox": {
        "get": {
            "operationId": "inbox",
            "summary": "Sessions addressed to the host in the access document, newest first",
            "parameters": [_ACCESS, *_SESSION_PAGE],
            "responses": {"200": _ok("Sessions", _ref("SessionList")), **_errors(400, 401, 429)},
        }
    },
    "/api/v1/heartbeats": {
        "post": {
            "operationId": "heartbeat",
            "summary": "A host's signed heartbeat: it is online",
            "requestBody": _signed_body("SignedHeartbeat"),
            "responses": {
                "200": _ok(
                    "Seen",
                    {
                        "type": "object",
                        "properties": {"host_id": _ID, "last_seen": _NUMBER_OR_NULL},
                    },
                ),
                **_errors(*_WRITE_ERRORS),
            },
        }
    },
    "/api/v1/hosts/{host_id}": {
        "get": {
            "operationId": "getHost",
            "summary": "A host's presence and its newest listings",
            "parameters": [_param("host_id", "path", _ID, "The host's ID.")],
            "responses": {"200": _ok("The host", _ref("Host")), **_errors(404, 429)},
        }
    },
}


def document(public_url: str, title: str = "OpenGrid Registry") -> dict[str, Any]:
    """The OpenAPI 3.1 document; paths are relative to ``public_url``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"{title} API",
            "version": "1",
            "description": "Signed listings of datasets and models held by standing hosts "
            "(metadata only, never data), search, presence, reviews and session requests. "
            'Every error is JSON {"error", "message"}.',
        },
        "servers": [{"url": public_url}],
        "paths": copy.deepcopy(_PATHS),
        "components": {"schemas": copy.deepcopy(_SCHEMAS)},
    }
