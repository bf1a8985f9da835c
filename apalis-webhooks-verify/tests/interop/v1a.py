"""Standard Webhooks `v1a` (ed25519) with Python's `cryptography`, for tests/v1a.rs.

Reads one JSON request from stdin and writes one JSON answer to stdout:

* {"verify": {"public_key": "whpk_…", "id", "timestamp", "body", "signature": header value}}
  -> {"valid": bool}: any `v1a` entry of the header verifies with the key;
* {"sign": {"id", "timestamp", "body"}} -> {"public_key": "whpk_…", "signature": "v1a,…"}
  with a fresh key.
"""
import base64
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def content(req):
    return f"{req['id']}.{req['timestamp']}.".encode() + req["body"].encode()


def verify(req):
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(req["public_key"].removeprefix("whpk_")))
    for entry in req["signature"].split(" "):
        version, _, signature = entry.partition(",")
        if version != "v1a":
            continue
        try:
            key.verify(base64.b64decode(signature), content(req))
            return {"valid": True}
        except (InvalidSignature, ValueError):
            pass
    return {"valid": False}


def sign(req):
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {
        "public_key": "whpk_" + base64.b64encode(public).decode(),
        "signature": "v1a," + base64.b64encode(key.sign(content(req))).decode(),
    }


request = json.load(sys.stdin)
answer = verify(request["verify"]) if "verify" in request else sign(request["sign"])
json.dump(answer, sys.stdout)
